"""Before any timing: do the contenders compute what the model computes?

Contract (all ranks reach the same verdict; any failure raises
:class:`CheckFailed` on every rank, and nothing is timed):

- each contender's all-reduce of every decode shape ([batch, hidden] bf16,
  small integers, so the sum is exact) equals the exact sum over its TP
  group, bit for bit;
- one eager decode step per contender and batch size gives the same logits
  (the last pipeline stage's) as the reference contender (torch.distributed
  when it runs) within ``rtol`` (relative Frobenius error): differences in
  reduction order and rounding legitimately compound over the layers (about
  6% after 80 layers in a CPU simulation of NCCL's per-hop bf16 rounding
  against a single rounding), while a wrong sum is of order 100%;
- optionally (``--check-tp1``), the reference's logits, every TP rank's
  vocabulary slice gathered, against one unsplit model (TP=1, PP=1) on rank
  0: the only check that sees a split (or a pipeline handoff) that every
  contender gets wrong alike.

Ranks that hold no logits (stages before the last) take part in every
agreement with nothing to compare.
"""
from __future__ import annotations

import json

import torch

from .comms import Contender
from .model import DecoderWeights, ModelShape, TensorParallelDecoder

__all__ = ["CheckFailed", "agree", "check_against_unsplit", "check_contenders"]


class CheckFailed(RuntimeError):
    """The contenders disagree, or disagree with the unsplit model. Nothing is timed."""


def check_contenders(contenders: list[Contender], inputs: dict, layout, hidden: int, rtol: float,
                     say) -> tuple[dict, dict]:
    """The exact all-reduce check and the eager logits comparison; returns (record, logits).

    ``logits[label][batch]`` is this rank's eager logits slice, None on a
    stage before the last.
    """
    world, rank, tp = layout.world, layout.tp.rank, layout.tp.world_size
    device = next(iter(inputs.values())).device
    exact: dict[str, bool] = {}
    for c in contenders:
        ok = True
        for b in inputs:
            i = torch.arange(b * hidden, device=device).remainder_(13).view(b, hidden)
            got = c.all_reduce((i + rank + 1).to(torch.bfloat16))
            # Sum over the TP group of (i % 13 + r + 1): at most 12 tp + tp(tp + 1)/2, exact in bf16.
            ok &= bool(torch.equal(got, (i * tp + tp * (tp + 1) // 2).to(torch.bfloat16)))
        exact[c.label] = agree(world, ok)
    logits = {c.label: {b: c.step(x) for b, x in inputs.items()} for c in contenders}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reference = next((c.label for c in contenders if c.flag == "torch"), contenders[0].label)
    comparisons = []
    for c in contenders:
        if c.label == reference:
            continue
        for b in inputs:
            ref, got = logits[reference][b], logits[c.label][b]
            local = None if got is None else {
                "max_abs_diff": (got.float() - ref.float()).abs().max().item(),
                "rel_err": ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item(),
                "finite": bool(torch.isfinite(got).all())}
            everyone = [e for e in _gather(world, local) if e is not None]
            comparisons.append({"comm": c.label, "batch": b,
                                "max_abs_diff": max(e["max_abs_diff"] for e in everyone),
                                "rel_err": max(e["rel_err"] for e in everyone),
                                "finite": all(e["finite"] for e in everyone)})
    largest = [v.float().abs().max().item() for v in logits[reference].values() if v is not None]
    check = {"reference": reference, "rtol": rtol, "exact_all_reduce": exact, "logits": comparisons,
             "graph_vs_eager": [],
             "max_abs_logit": max(m for m in _gather(world, max(largest, default=None)) if m is not None)}
    bad_exact = [label for label, ok in exact.items() if not ok]
    bad_logits = [c for c in comparisons if not (c["finite"] and c["rel_err"] <= rtol)]
    check["passed"] = not bad_exact and not bad_logits
    for c in comparisons:
        say(f"check {c['comm']} vs {reference}, batch {c['batch']}: max |diff| {c['max_abs_diff']:.4g}, "
            f"relative error {c['rel_err']:.3g} (tolerance {rtol:g})")
    if bad_exact or bad_logits:
        lines = [f"{label}: its all-reduce of a [batch, hidden] bf16 tensor of small integers is not "
                 "the exact sum" for label in bad_exact]
        lines += [f"{c['comm']} vs {reference} at batch {c['batch']}: relative error {c['rel_err']:.3g} > "
                  f"{rtol:g} (max |diff| {c['max_abs_diff']:.4g}{'' if c['finite'] else ', not finite'})"
                  for c in bad_logits]
        raise CheckFailed("logits check FAILED, nothing was timed:\n  " + "\n  ".join(lines))
    say(f"logits check passed: {len(contenders)} contenders, reference {reference}"
        + ("" if comparisons else " (only one contender: nothing to compare)"))
    return check, logits


def check_against_unsplit(shape: ModelShape, seed: int, logits: dict, inputs: dict, layout, rtol: float, say,
                          label: str) -> list[dict]:
    """The last stage's logits (every TP rank's vocabulary slice, gathered) against one unsplit model on rank 0."""
    world, tp, pp = layout.world, layout.tp_size, layout.pp_size
    # Every rank gathers; only the last stage's ranks have logits, in TP-rank order
    # (their global ranks are consecutive: see distrib.parallel).
    gathered = {b: [r for r in world.all_gather(b"" if logits[b] is None else
                                                 logits[b].float().cpu().contiguous().numpy().tobytes()) if r]
                for b in inputs}
    results = []
    if world.rank == 0:
        device = next(iter(inputs.values())).device
        whole = TensorParallelDecoder(DecoderWeights(shape, 1, 0, max(inputs), device, seed))
        for b, x in inputs.items():
            expected = whole.step(x, lambda t: t).float().cpu()
            split = torch.cat([torch.frombuffer(bytearray(r), dtype=torch.float32).view(b, -1)
                               for r in gathered[b]], dim=-1)
            results.append({"batch": b, "rel_err": ((split - expected).norm()
                                                    / expected.norm().clamp_min(1e-30)).item(),
                            "finite": bool(torch.isfinite(split).all())})
        del whole
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = json.loads(world.broadcast(json.dumps(results).encode(), src=0))
    bad = [r for r in results if not (r["finite"] and r["rel_err"] <= rtol)]
    split_name, unsplit = (f"TP={tp}", "TP=1") if pp == 1 else (f"TP={tp} x PP={pp}", "TP=1, PP=1")
    for r in results:
        say(f"check {label} ({split_name}) vs one unsplit model ({unsplit}), batch {r['batch']}: "
            f"relative error {r['rel_err']:.3g} (tolerance {rtol:g})")
    if bad:
        raise CheckFailed(f"logits check against one unsplit model ({unsplit}) FAILED, nothing was timed:\n  "
                          + "\n  ".join(f"batch {r['batch']}: relative error {r['rel_err']:.3g} > {rtol:g}"
                                        + ("" if r["finite"] else ", not finite") for r in bad))
    return results


def agree(coord, ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank."""
    return all(r == b"1" for r in coord.all_gather(b"1" if ok else b"0"))


def _gather(coord, value) -> list:
    return [json.loads(r) for r in coord.all_gather(json.dumps(value).encode())]
