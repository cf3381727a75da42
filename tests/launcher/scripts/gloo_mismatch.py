"""Rank 0 all-reduces 4 elements, rank 1 eight: gloo aborts a process (or, with DISTRIB_DEBUG=1,
every rank raises first, naming the shapes)."""
import torch

import distrib
from distrib import communicator

ctx = distrib.init()
comm = communicator.create()
x = torch.ones(4 if ctx.rank == 0 else 8)
comm.all_reduce(x)
