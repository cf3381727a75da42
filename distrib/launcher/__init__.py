"""Launchers: start the processes of a launch and hand each its LaunchInfo.

Registered here: ``multiprocessing`` (:func:`distrib.launch`, Python
callables), ``subprocess`` (``distrib-run``, programs) and ``slurm``
(``distrib-run --launcher slurm``, programs through ``srun``).
"""
from .api import Command, CommandLauncher, CommandOptions, LaunchInterrupted, Launcher, launchers
from .multiprocessing import MultiprocessingLauncher, launch
from .slurm import SlurmLauncher
from .subprocess import SubprocessLauncher

__all__ = ["Command", "CommandLauncher", "CommandOptions", "LaunchInterrupted", "Launcher",
           "MultiprocessingLauncher", "SlurmLauncher", "SubprocessLauncher", "launch", "launchers"]
