"""Tests of the launchers: distrib-run, SLURM, several nodes."""
