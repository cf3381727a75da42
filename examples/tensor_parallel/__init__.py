"""The tensor-parallel decode example's parts (the entry point is ``examples/tensor_parallel_decode.py``).

- ``model``:   a Llama-style decoder split across ranks, random deterministic weights
- ``comms``:   the contenders: distrib's dispatcher, distrib's NCCL, torch.distributed
- ``measure``: what each rank runs: checks, CUDA-graph capture, timing, memory
- ``report``:  JSON, console and markdown tables, plot
"""
