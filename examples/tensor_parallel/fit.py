"""What fits in GPU memory: how many layers to build, and which model to pick when none is named.

Pure functions of byte counts (no CUDA calls), so that CPU tests cover them:
``measure.py`` gives them what ``torch.cuda.mem_get_info`` said on every rank,
gathered, so that every rank decides alike, before any rank builds its part of
the model.

What one GPU must hold, for ``L`` layers of a model split ``tp`` x ``pp``:

- for each rank on it (ranks may share a GPU: ``--devices 0,0``,
  ``--share-gpu``), its shard of the most layers a stage holds
  (``ceil(L / pp)``, weights and KV cache, :meth:`ModelShape.bytes_per_rank`)
  and of the LM head (counted on every stage), plus a reserve left free for
  activations, the CUDA graphs' pool, NCCL's capture costs and the custom
  kernel's buffers: ``max(8 GiB, 6 % of the GPU)`` per rank;
- on the GPU of rank 0, when the logits are checked against one unsplit model
  (``--check-tp1``, on by default when ranks share a GPU), that model too
  (TP=1, all ``L`` layers), built while every shard is still there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .model import ModelShape

__all__ = ["GIB", "DoesNotFit", "Fit", "Gpu", "choose", "gpus_from", "needed", "reserve"]

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    """One GPU as the launch uses it: bytes free and in all, the ranks on it, whether it holds the unsplit model."""

    free: int
    total: int
    ranks: int = 1
    unsplit: bool = False
    name: str = "the GPU"


@dataclass(frozen=True)
class Fit:
    """The model to build (``shape.layers``: how many of its layers) and sentences saying why."""

    shape: ModelShape
    layers_note: str              # "80 of 80 layers (all)", or why fewer
    model_note: Optional[str]     # why this model, when none was named; else None


class DoesNotFit(ValueError):
    """Not even one layer per pipeline stage of the model fits (the message names ``--model`` and the sizes)."""


def reserve(total: int) -> int:
    """Bytes left free per rank on a GPU of ``total`` bytes (see the module's docstring)."""
    return max(8 * GIB, int(0.06 * total))


def needed(shape: ModelShape, layers: int, tp: int, pp: int, max_batch: int, gpu: Gpu) -> int:
    """Bytes ``gpu`` must have free for ``layers`` layers of ``shape``, reserves included."""
    per_layer, fixed = shape.bytes_per_rank(tp, max_batch)
    need = gpu.ranks * (per_layer * -(-layers // pp) + fixed + reserve(gpu.total))
    return need + (_unsplit_bytes(shape, layers, max_batch) if gpu.unsplit else 0)


def _unsplit_bytes(shape: ModelShape, layers: int, max_batch: int) -> int:
    """Bytes of ``layers`` layers of ``shape`` and its LM head on one rank (TP=1)."""
    per_layer, fixed = shape.bytes_per_rank(1, max_batch)
    return per_layer * layers + fixed


def gpus_from(seen: Sequence[Mapping], unsplit_rank: Optional[int]) -> list[Gpu]:
    """One :class:`Gpu` per distinct ``seen[i]["gpu"]``, from every rank's ``{"gpu", "name", "free", "total", "rank"}``.

    ``free`` is the least any of the GPU's ranks saw; ``unsplit_rank`` is the
    rank that builds the unsplit model (None: no unsplit model).
    """
    by_gpu: dict = {}
    for row in seen:
        by_gpu.setdefault(row["gpu"], []).append(row)
    return [Gpu(free=min(r["free"] for r in rows), total=rows[0]["total"], ranks=len(rows),
                unsplit=any(r["rank"] == unsplit_rank for r in rows), name=rows[0]["name"])
            for rows in by_gpu.values()]


def choose(shapes: Mapping[str, ModelShape], model: Optional[str], layers: Optional[int], tp: int, pp: int,
           max_batch: int, gpus: Sequence[Gpu]) -> Fit:
    """The model and layer count to build on ``gpus`` (none: no memory limit, as on CPUs).

    ``model`` named (``--model``): every layer (or ``layers``, ``--layers``)
    if they fit, else as many as fit on every GPU, said so; :class:`DoesNotFit`
    if not even one per stage does. ``model`` None: the largest of ``shapes``
    (by the bytes of the whole model) that splits ``tp`` ways and whose layers
    all fit; if none does, the smallest, as above.
    """
    if model is not None:
        return _layers_that_fit(shapes[model], layers, tp, pp, max_batch, gpus, None)
    candidates = sorted((s for s in shapes.values() if s.problem_with(tp) is None and (layers or s.layers) >= pp),
                        key=lambda s: _unsplit_bytes(s, layers or s.layers, 1))
    if not candidates:
        raise DoesNotFit(f"none of the models ({', '.join(shapes)}) can be split {tp} ways into {pp} "
                         "pipeline stages; name one with --model to see why")
    larger = None  # why the model passed over last (the next larger one) does not fit
    for shape in reversed(candidates):
        wanted = layers or shape.layers
        short = _short(shape, wanted, tp, pp, max_batch, gpus)
        if short is None:
            return _layers_that_fit(shape, layers, tp, pp, max_batch, gpus,
                                    f"{shape.name}, the largest model whose {wanted} layers fit"
                                    + (f" ({larger})" if larger else "") + "; --model names another")
        larger = (f"{shape.name} would need {needed(shape, wanted, tp, pp, max_batch, short) / GIB:.1f} GiB of "
                  f"the {short.free / GIB:.1f} GiB free on {short.name}{_shared_by(short)}")
    smallest = candidates[0]
    return _layers_that_fit(smallest, layers, tp, pp, max_batch, gpus,
                            f"{smallest.name}, the smallest model that splits {tp} ways, as no model's layers "
                            f"all fit ({larger})")


def _short(shape: ModelShape, layers: int, tp: int, pp: int, max_batch: int, gpus: Sequence[Gpu]) -> Optional[Gpu]:
    """The first GPU that ``layers`` layers of ``shape`` do not fit on, or None."""
    return next((g for g in gpus if needed(shape, layers, tp, pp, max_batch, g) > g.free), None)


def _layers_that_fit(shape: ModelShape, layers: Optional[int], tp: int, pp: int, max_batch: int,
                     gpus: Sequence[Gpu], model_note: Optional[str]) -> Fit:
    wanted = layers or shape.layers
    if wanted < pp:
        raise DoesNotFit(f"{wanted} layers cannot be cut into {pp} pipeline stages of at least one layer each")
    count = next((n for n in range(wanted, pp - 1, -1) if _short(shape, n, tp, pp, max_batch, gpus) is None), None)
    if count is None:
        named = shape.name if model_note else f"--model {shape.name}"
        raise DoesNotFit(_too_big(named, shape, tp, pp, max_batch, _short(shape, pp, tp, pp, max_batch, gpus)))
    if count == wanted:
        source = f"--layers {layers}" if layers else "all"
        return Fit(shape.with_layers(count), f"{count} of {shape.layers} layers ({source})", model_note)
    tight = min(gpus, key=lambda g: g.free // g.ranks)
    per_layer = shape.bytes_per_rank(tp, max_batch)[0]
    note = (f"{count} of {shape.layers} layers: limited by GPU memory ({tight.free / GIB:.1f} GiB free on "
            f"{tight.name}{_shared_by(tight)}, {per_layer / GIB:.2f} GiB per layer with its KV cache, "
            f"{reserve(tight.total) / GIB:.1f} GiB kept free per rank"
            + (f", {-(-count // pp)} layers per stage" if pp > 1 else "")
            + (", and the unsplit model of the TP=1 check" if any(g.unsplit for g in gpus) else "") + ")")
    return Fit(shape.with_layers(count), note, model_note)


def _too_big(named: str, shape: ModelShape, tp: int, pp: int, max_batch: int, gpu: Gpu) -> str:
    per_layer, fixed = shape.bytes_per_rank(tp, max_batch)
    each = (f"{per_layer / GIB:.2f} GiB per layer with its KV cache + {fixed / GIB:.2f} GiB of LM head + "
            f"{reserve(gpu.total) / GIB:.1f} GiB kept free")
    parts = [f"{gpu.ranks} ranks x ({each})" if gpu.ranks > 1 else each]
    if gpu.unsplit:
        parts.append(f"{_unsplit_bytes(shape, pp, max_batch) / GIB:.2f} GiB for the unsplit model of the TP=1 "
                     "check on rank 0")
    return (f"{named} does not fit: even one layer per pipeline stage needs "
            f"{needed(shape, pp, tp, pp, max_batch, gpu) / GIB:.1f} GiB on {gpu.name}{_shared_by(gpu)} "
            f"({' + '.join(parts)}), and {gpu.free / GIB:.1f} GiB is free. Name a smaller --model, "
            "or use fewer ranks per GPU or smaller --batch-sizes")


def _shared_by(gpu: Gpu) -> str:
    return f" (shared by {gpu.ranks} ranks)" if gpu.ranks > 1 else ""
