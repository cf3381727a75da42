"""Launchers: start the processes of a launch and hand each its LaunchInfo."""
from .api import Launcher, launchers
from .multiprocessing import MultiprocessingLauncher, launch

__all__ = ["Launcher", "MultiprocessingLauncher", "launch", "launchers"]
