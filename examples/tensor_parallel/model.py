"""A Llama-style decoder, split for tensor and pipeline parallelism, with random weights.

Contract of the split (Megatron-style, as in vLLM and TensorRT-LLM): rank ``r``
of ``tp`` holds

- the column-parallel projections' output rows of its own heads and
  intermediate blocks (``qkv``, ``gate_up``, the LM head's vocabulary rows),
- the row-parallel projections' input columns that match them (``o``, ``down``),
- the KV cache of its own KV heads,
- RMSNorm weights whole.

So attention and the MLP each end in a partial sum on every rank, and one
all-reduce per block (two per layer) makes the residual stream whole again.
The LM head's output stays split by vocabulary: rank ``r`` returns its slice
of the logits (a sampler would gather or arg-max across ranks; that is left
out, as is the token embedding, so that the only collectives in a step are
the two all-reduces per layer).

Pipeline parallelism cuts the layers into ``pp`` contiguous stages (stage
``s`` holds layers ``[s L / pp, (s + 1) L / pp)``, rounded down, so uneven
splits are allowed; see :func:`pipeline_stage`). The new tokens' hidden states
enter the first stage; the final norm and the LM head belong to the last one.
Inside a stage, tensor parallelism works as above; between stages, each TP
rank hands its (whole, replicated) hidden state to the same TP rank of the
next stage (:func:`run_stage`).

Weights are random and deterministic. Every matrix is cut into blocks that no
tensor-parallel split ever divides (one attention head; one of ``BLOCKS``
slices of the intermediate or vocabulary dimension), and each block is drawn
from its own seed ``(seed, layer, kind, block)``. A rank generates only its
own blocks, on its own device, and the full matrix the shards belong to is the
same for every ``tp`` and every ``pp`` (on one kind of device: CPU and CUDA
generators draw different numbers; a layer's seeds use its index in the whole
model): a TP=2 x PP=2 run computes what a TP=1 run computes, up to the
rounding of the partial sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["BLOCKS", "SHAPES", "DecoderWeights", "ModelShape", "Stage", "TensorParallelDecoder", "decode_inputs",
           "pipeline_stage", "run_stage"]

# The intermediate size and the vocabulary are cut into this many seed
# blocks (attention is cut by heads); tensor-parallel degrees must divide it.
BLOCKS = 8
DTYPE = torch.bfloat16
AllReduce = Callable[[torch.Tensor], torch.Tensor]
Send = Callable[[torch.Tensor, int], None]            # send(t, dst): to a stage of the pipeline group
Recv = Callable[[torch.Tensor, int], torch.Tensor]    # recv(t, src): into t, returns t


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder; ``context``: tokens already in the KV cache."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int = 512
    room: int = 128  # free cache slots after the context (the cache is context + room long)
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def cache_len(self) -> int:
        return self.context + self.room

    def with_layers(self, layers: int) -> "ModelShape":
        return replace(self, layers=layers)

    def problem_with(self, tp: int) -> Optional[str]:
        """Why this shape cannot be split ``tp`` ways, or None."""
        if self.hidden % self.heads:
            return f"hidden {self.hidden} is not a multiple of heads {self.heads}"
        if self.heads % self.kv_heads:
            return f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}"
        if self.head_dim % 2:
            return f"head_dim {self.head_dim} is odd (rotary embeddings rotate pairs)"
        for what, size in (("intermediate", self.intermediate), ("vocab", self.vocab)):
            if size % BLOCKS:
                return f"{what} {size} is not a multiple of {BLOCKS}"
        if BLOCKS % tp or self.kv_heads % tp:
            return (f"tensor-parallel degree {tp} must divide {BLOCKS} and kv_heads "
                    f"{self.kv_heads} (use 1, 2, 4 or 8 ranks)")
        return None

    def bytes_per_rank(self, tp: int, max_batch: int) -> tuple[int, int]:
        """(bytes of one layer, bytes outside the layers) on one rank, weights and KV cache."""
        hd, size = self.head_dim, torch.empty(0, dtype=DTYPE).element_size()
        weights = (self.heads + 2 * self.kv_heads) * hd * self.hidden + self.heads * hd * self.hidden \
            + 3 * self.intermediate * self.hidden
        cache = 2 * max_batch * self.kv_heads * self.cache_len * hd
        per_layer = (weights + cache) // tp * size + 2 * self.hidden * size
        return per_layer, (self.vocab // tp + 1) * self.hidden * size


SHAPES = {
    # Small enough for two CPU ranks in CI; still GQA (2 query heads per KV head).
    "tiny": ModelShape("tiny", hidden=256, intermediate=512, layers=4, heads=8, kv_heads=4, vocab=1024,
                       context=64, room=16),
    # Llama 3 8B and 70B: hidden, intermediate, layers, heads, KV heads, vocabulary.
    "llama-8b": ModelShape("llama-8b", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                           vocab=128256),
    "llama-70b": ModelShape("llama-70b", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8,
                            vocab=128256),
}


@dataclass(frozen=True)
class Stage:
    """Pipeline stage ``index`` of ``count``; ``layers``: the model's layers it holds (indices in the whole model)."""

    index: int
    count: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


def pipeline_stage(layers: int, pp: int, index: int) -> Stage:
    """Stage ``index`` of ``pp``: layers ``[index * layers // pp, (index + 1) * layers // pp)``.

    Contiguous, at least one layer each, uneven where ``pp`` does not divide
    ``layers`` (later stages hold the extra ones). Raises ValueError for fewer
    layers than stages or an index outside ``0..pp - 1``.
    """
    if not 0 <= index < pp:
        raise ValueError(f"pipeline stage {index} is outside 0..{pp - 1}")
    if layers < pp:
        raise ValueError(f"{layers} layers cannot be cut into {pp} pipeline stages of at least one layer each")
    return Stage(index, pp, range(index * layers // pp, (index + 1) * layers // pp))


class _Kind(IntEnum):
    """Which tensor a seed block belongs to (part of the seed)."""

    Q, K, V, O, GATE, UP, DOWN, LM_HEAD, CACHE_K, CACHE_V, INPUT = range(11)


def _block_seed(seed: int, layer: int, kind: _Kind, block: int) -> int:
    # Any injective-enough mix will do; it only has to be the same on every rank and every tp.
    return ((((seed * 1_000_003) + layer) * 101 + int(kind)) * 1_000_033 + block) % (1 << 62)


class _BlockFiller:
    """Fills tensors with N(0, std²) blocks, each from its own seed, on one device."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.generator = torch.Generator(device=device)

    def block(self, shape: tuple, layer: int, kind: _Kind, index: int, std: float) -> torch.Tensor:
        self.generator.manual_seed(_block_seed(self.seed, layer, kind, index))
        # Drawn contiguous in float32, whatever the destination's layout: the
        # values depend only on the seed and the block's shape.
        values = torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return values.mul_(std).to(DTYPE)

    def rows(self, dest: torch.Tensor, layer: int, kind: _Kind, first: int, size: int, std: float) -> None:
        """Fill ``dest`` with row blocks ``first, first + 1, ...`` of ``size`` rows each."""
        for i in range(dest.shape[0] // size):
            dest[i * size:(i + 1) * size].copy_(self.block((size, dest.shape[1]), layer, kind, first + i, std))

    def columns(self, dest: torch.Tensor, layer: int, kind: _Kind, first: int, size: int, std: float) -> None:
        """Fill ``dest`` with column blocks ``first, first + 1, ...`` of ``size`` columns each."""
        for i in range(dest.shape[1] // size):
            dest[:, i * size:(i + 1) * size].copy_(self.block((dest.shape[0], size), layer, kind, first + i, std))


@dataclass
class _Layer:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor        # [(heads + 2 kv_heads) / tp * head_dim, hidden]: q rows, then k, then v
    o: torch.Tensor          # [hidden, heads / tp * head_dim]
    mlp_norm: torch.Tensor   # [hidden]
    gate_up: torch.Tensor    # [2 intermediate / tp, hidden]: gate rows, then up
    down: torch.Tensor       # [hidden, intermediate / tp]
    cache_k: torch.Tensor    # [max_batch, kv_heads / tp, cache_len, head_dim]
    cache_v: torch.Tensor


class DecoderWeights:
    """Rank ``rank`` of ``tp``'s shard of a random decoder, with a KV cache for ``max_batch`` sequences.

    ``stage``: the pipeline stage whose layers to hold (default: one stage,
    every layer); the final norm and LM head only on the last stage (else
    None). The first ``shape.context`` cache positions of every sequence hold
    random keys and values (as if a prompt had been prefilled); the rest is empty.
    """

    def __init__(self, shape: ModelShape, tp: int, rank: int, max_batch: int, device: torch.device,
                 seed: int = 0, stage: Optional[Stage] = None):
        problem = shape.problem_with(tp)
        if problem is not None:
            raise ValueError(f"model {shape.name!r} cannot be split {tp} ways: {problem}")
        if not 0 <= rank < tp:
            raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
        if stage is None:
            stage = pipeline_stage(shape.layers, 1, 0)
        if stage.layers.stop > shape.layers:
            raise ValueError(f"stage {stage.index} holds layers up to {stage.layers.stop - 1}; "
                             f"model {shape.name!r} has {shape.layers}")
        self.shape, self.tp, self.rank, self.max_batch, self.device = shape, tp, rank, max_batch, device
        self.stage = stage
        s, hd = shape, shape.head_dim
        self.heads, self.kv_heads = s.heads // tp, s.kv_heads // tp
        self.intermediate, self.vocab = s.intermediate // tp, s.vocab // tp
        blocks = BLOCKS // tp  # of the intermediate and vocabulary dimensions, per rank
        inter_block, vocab_block = s.intermediate // BLOCKS, s.vocab // BLOCKS
        fill = _BlockFiller(seed, device)
        # std 1/sqrt(fan_in): every projection keeps unit-scale activations, so
        # the residual stream grows only slowly over 80 layers (finite in bf16).
        std_hidden = 1 / math.sqrt(s.hidden)
        self.layers: list[_Layer] = []
        for layer in stage.layers:  # seeded by its index in the whole model: any split, same weights
            q_rows, kv_rows = self.heads * hd, self.kv_heads * hd
            qkv = torch.empty(q_rows + 2 * kv_rows, s.hidden, dtype=DTYPE, device=device)
            fill.rows(qkv[:q_rows], layer, _Kind.Q, rank * self.heads, hd, std_hidden)
            fill.rows(qkv[q_rows:q_rows + kv_rows], layer, _Kind.K, rank * self.kv_heads, hd, std_hidden)
            fill.rows(qkv[q_rows + kv_rows:], layer, _Kind.V, rank * self.kv_heads, hd, std_hidden)
            o = torch.empty(s.hidden, q_rows, dtype=DTYPE, device=device)
            fill.columns(o, layer, _Kind.O, rank * self.heads, hd, 1 / math.sqrt(s.heads * hd))
            gate_up = torch.empty(2 * self.intermediate, s.hidden, dtype=DTYPE, device=device)
            fill.rows(gate_up[:self.intermediate], layer, _Kind.GATE, rank * blocks, inter_block, std_hidden)
            fill.rows(gate_up[self.intermediate:], layer, _Kind.UP, rank * blocks, inter_block, std_hidden)
            down = torch.empty(s.hidden, self.intermediate, dtype=DTYPE, device=device)
            fill.columns(down, layer, _Kind.DOWN, rank * blocks, inter_block, 1 / math.sqrt(s.intermediate))
            caches = []
            for kind in (_Kind.CACHE_K, _Kind.CACHE_V):
                cache = torch.zeros(max_batch, self.kv_heads, s.cache_len, hd, dtype=DTYPE, device=device)
                for h in range(self.kv_heads):
                    cache[:, h, :s.context] = fill.block((max_batch, s.context, hd), layer, kind,
                                                         rank * self.kv_heads + h, 1.0)
                caches.append(cache)
            ones = torch.ones(s.hidden, dtype=DTYPE, device=device)
            self.layers.append(_Layer(ones, qkv, o, ones.clone(), gate_up, down, *caches))
        self.final_norm: Optional[torch.Tensor] = None
        self.lm_head: Optional[torch.Tensor] = None
        if stage.is_last:
            self.final_norm = torch.ones(s.hidden, dtype=DTYPE, device=device)
            self.lm_head = torch.empty(self.vocab, s.hidden, dtype=DTYPE, device=device)
            fill.rows(self.lm_head, 0, _Kind.LM_HEAD, rank * blocks, vocab_block, std_hidden)


def decode_inputs(shape: ModelShape, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The hidden states of ``batch`` new tokens (standing in for their embeddings); the same on every rank."""
    return _BlockFiller(seed, device).block((batch, shape.hidden), 0, _Kind.INPUT, batch, 1.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class TensorParallelDecoder:
    """One decode step of the sharded decoder (this rank's stage of it): ``batch`` sequences, one new token each.

    ``step(x, all_reduce)`` takes the hidden states ``x`` entering this
    rank's stage ([batch, hidden], the same on every rank of the stage, batch
    <= max_batch; on the first stage the new tokens') and returns, on the
    last stage, this rank's slice of the logits ([batch, vocab / tp]), on the
    others the hidden states leaving the stage ([batch, hidden], whole: the
    same on every TP rank). ``all_reduce(t)``
    must return the sum of ``t`` over the ranks (in place or a new tensor); it
    is called twice per layer of the stage, with [batch, hidden] tensors, in
    the same order on every rank. Passing the hidden states between stages
    is :func:`run_stage`'s.

    The new token's position is fixed at ``shape.context`` (static shapes and
    addresses, so a step can be captured in a CUDA graph): every step writes
    its keys and values to cache slot ``context`` and attends over slots
    ``0..context``, so repeated steps (and replays) compute the same thing.
    """

    def __init__(self, weights: DecoderWeights):
        self.weights = weights
        s, hd = weights.shape, weights.shape.head_dim
        self.position = s.context
        # Rotary embedding (rotate-half form) of the fixed position, in float32.
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.cat([inv_freq, inv_freq]) * self.position
        self.cos = angles.cos().to(weights.device)
        self.sin = angles.sin().to(weights.device)

    def _rotary(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * self.cos + rotated * self.sin).to(x.dtype)

    def step(self, x: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
        w = self.weights
        s, hd = w.shape, w.shape.head_dim
        batch, pos = x.shape[0], self.position
        if batch > w.max_batch:
            raise ValueError(f"batch {batch} exceeds the KV cache's {w.max_batch} sequences")
        q_width, kv_width, group = w.heads * hd, w.kv_heads * hd, w.heads // w.kv_heads
        h = x
        for layer in w.layers:
            # Attention: column-parallel qkv, this rank's heads only ...
            qkv = F.linear(rms_norm(h, layer.attn_norm, s.norm_eps), layer.qkv)
            q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
            q = self._rotary(q.view(batch, w.heads, hd))
            layer.cache_k[:batch, :, pos] = self._rotary(k.view(batch, w.kv_heads, hd))
            layer.cache_v[:batch, :, pos] = v.view(batch, w.kv_heads, hd)
            # GQA without copying the cache: the query heads that share a KV head
            # are that head's "query positions" ([batch, kv_heads, group, hd]).
            attended = F.scaled_dot_product_attention(
                q.view(batch, w.kv_heads, group, hd), layer.cache_k[:batch, :, :pos + 1],
                layer.cache_v[:batch, :, :pos + 1])
            # ... row-parallel output projection: a partial sum, made whole by the all-reduce.
            h = h + all_reduce(F.linear(attended.reshape(batch, q_width), layer.o))
            # Gated MLP: column-parallel gate/up, row-parallel down, one all-reduce.
            gate, up = F.linear(rms_norm(h, layer.mlp_norm, s.norm_eps), layer.gate_up).chunk(2, dim=-1)
            h = h + all_reduce(F.linear(F.silu(gate) * up, layer.down))
        if w.lm_head is None:  # not the last stage: the next one takes it from here
            return h
        return F.linear(rms_norm(h, w.final_norm, s.norm_eps), w.lm_head)


def run_stage(stage: Stage, compute: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              send: Optional[Send], recv: Optional[Recv]) -> Optional[torch.Tensor]:
    """One pipelined decode step on one rank of ``stage``: the last stage's logits, None elsewhere.

    - ``compute(h)``: this stage's part (:meth:`TensorParallelDecoder.step`
      with its all-reduce);
    - ``x``: the new tokens' hidden states [batch, hidden]; the first stage
      starts from them, the others from what the stage before sends (of the
      same shape and dtype);
    - ``send(t, dst)``, ``recv(t, src)``: point-to-point between the ranks of
      this rank's pipeline group (the same TP rank of every stage), by stage
      index; unused with one stage.

    Decode is autoregressive: a step's input depends on the tokens the step
    before sampled. So the last stage hands its tokens back to the first, and
    the first stage's step ends when they arrive: a step ends on every rank
    only when every stage has done its part, one batch's steps never overlap,
    and the time of a step is the whole pipeline's. The tokens are this TP
    rank's arg-max over its vocabulary slice ([batch] int64; a stand-in, as
    sampling across the TP ranks' slices is left out).
    """
    if stage.count == 1:
        return compute(x)
    if send is None or recv is None:
        raise ValueError(f"a pipeline of {stage.count} stages needs send and recv")
    h = x if stage.is_first else recv(torch.empty_like(x), stage.index - 1)
    out = compute(h)
    if stage.is_last:
        send(out.argmax(dim=-1), 0)
        return out
    send(out, stage.index + 1)
    if stage.is_first:
        recv(torch.empty(x.shape[0], dtype=torch.int64, device=x.device), stage.count - 1)
    return None
