"""Coordinators: small control messages between the processes of a launch."""
from .api import DEFAULT_TIMEOUT, Coordinator, coordinators
from .gloo import GlooCoordinator

__all__ = ["Coordinator", "DEFAULT_TIMEOUT", "GlooCoordinator", "coordinators"]
