"""Benchmarks, run as ``python -m distrib.bench <name>``.

- ``allreduce``: the latency of one all-reduce for every communicator and the
  peers (torch.distributed NCCL, PyTorch symmetric memory), eager and in CUDA
  graphs; ``--smoke`` runs it on CPU ranks for CI.
"""
