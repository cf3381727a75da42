"""The tensor-parallel decode example's parts (the entry point is ``examples/tensor_parallel_decode.py``).

- ``model``:   a Llama-style decoder split across ranks (TP) and stages (PP), random deterministic weights
- ``comms``:   the contenders: distrib's dispatcher, distrib's NCCL, torch.distributed
- ``checks``:  before timing: exact all-reduces, logits against each other and the unsplit model
- ``measure``: what each rank runs: layout, checks, CUDA-graph capture, timing, memory
- ``report``:  JSON, console and markdown tables, plot
"""
