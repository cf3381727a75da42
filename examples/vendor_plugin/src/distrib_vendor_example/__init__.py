"""An example vendor plug-in for distrib (see README.md)."""
from .communicator import ByteExchangeCommunicator

__all__ = ["ByteExchangeCommunicator"]
