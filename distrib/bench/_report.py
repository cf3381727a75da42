"""The all-reduce benchmark's outputs: a JSON record, a markdown table, a log-log plot.

Per case, the time of one all-reduce is the slowest rank's (ranks take part in
the same all-reduce, so the slowest one is when it is done); the record keeps
the median and the 10th and 90th percentiles over the timed iterations, and
the ratio of each median to the baseline's (torch.distributed NCCL on GPUs,
gloo on CPUs) for the same mode, dtype and size.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

BASELINES = ("torch:nccl", "torch:gloo")


def percentile(values: list, q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of ``values``."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(per_rank: list[dict], meta: dict) -> dict:
    """Merge the ranks' measurements into one record per case, with stats and ratios."""
    world_size = len(per_rank)
    results = []
    for index, first in enumerate(per_rank[0]["cases"]):
        cases = [facts["cases"][index] for facts in per_rank]
        record = {k: first[k] for k in ("target", "mode", "dtype", "size", "numel")}
        record["declined"] = first.get("declined")
        record["correct"] = None if first["error"] or record["declined"] else all(c["correct"] for c in cases)
        record["error"] = first["error"]
        runs = [c["times_us"] for c in cases]
        if not record["error"] and runs[0] and all(len(r) == len(runs[0]) for r in runs):
            slowest = [max(times) for times in zip(*runs)]
            median = percentile(slowest, 50)
            record.update(iterations=len(slowest), median_us=median, p10_us=percentile(slowest, 10),
                          p90_us=percentile(slowest, 90),
                          host_us_per_call=max(c["host_us"] for c in cases),
                          busbw_gbps=(first["size"] / (median * 1e-6) * 2 * (world_size - 1) / world_size / 1e9
                                      if world_size > 1 and median > 0 else None))
        results.append(record)
    baseline = next((b for b in BASELINES if any(r["target"] == b for r in results)), None)
    reference = {(r["mode"], r["dtype"], r["size"]): r.get("median_us") for r in results
                 if r["target"] == baseline}
    for r in results:
        ref = reference.get((r["mode"], r["dtype"], r["size"]))
        r["ratio_to_baseline"] = r["median_us"] / ref if ref and r.get("median_us") else None
    disabled: dict = {}
    for facts in per_rank:
        disabled.update(facts.get("disabled", {}))
    return {"meta": {**meta, "baseline": baseline, "disabled": disabled}, "results": results}


def write_json(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n")


def save(summary: dict, table: str, out: Path, stem: str) -> None:
    """``out``/``stem``.json and .md, then the table on stdout and the paths on stderr."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(summary, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}", file=sys.stderr)


def size_text(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def markdown(summary: dict) -> str:
    meta, results = summary["meta"], summary["results"]
    targets = _targets(results)
    lines = [f"# All-reduce latency: {meta['nprocs']} × {meta['device_name']}", "",
             f"{meta['date']} · commit `{meta['commit']}` · torch {meta.get('torch', '?')}"
             f"{' · NCCL ' + meta['torch_nccl'] if meta.get('torch_nccl') else ''}", "",
             f"Median µs per all-reduce [p10–p90] (slowest rank per iteration); ×: ratio to "
             f"`{meta['baseline']}` (below 1 is faster). Results checked on every size: "
             "✗ marks a wrong result; \"declined\": the communicator does not take that size by "
             "design (the dispatcher routes it on). Eager: one Python call per all-reduce. CUDA graph: "
             f"{meta['config'].get('graph_ops')} all-reduces captured in one graph, time per all-reduce. "
             "Symmetric memory is timed on its own symmetric buffer (no copy in).", ""]
    for mode in meta["config"]["modes"]:
        for dtype in meta["config"]["dtypes"]:
            rows = [r for r in results if r["mode"] == mode and r["dtype"] == dtype]
            if not rows:
                continue
            lines += [f"## {'CUDA graph' if mode == 'graph' else 'Eager'}, {dtype}", "",
                      "| size | " + " | ".join(f"`{t}`" for t in targets) + " |",
                      "|---:|" + "---:|" * len(targets)]
            for size in sorted({r["size"] for r in rows}):
                cells = [_cell(next((r for r in rows if r["size"] == size and r["target"] == t), None))
                         for t in targets]
                lines.append(f"| {size_text(size)} | " + " | ".join(cells) + " |")
            lines.append("")
    eager = _eager_small_message(results, meta)
    if eager:
        lines += ["## Eager cost per call, smallest message", "", eager, ""]
    if meta.get("disabled"):
        lines += ["## Not measured", ""] + [f"- `{name}`: {why}" for name, why in meta["disabled"].items()] + [""]
    return "\n".join(lines)


def _targets(results: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["target"] not in seen:
            seen.append(r["target"])
    return sorted(seen, key=lambda t: (t not in BASELINES, not t.startswith("distrib:"), t))


def _cell(record: Optional[dict]) -> str:
    if record is None:
        return "–"
    if record.get("declined"):
        return "declined"
    if record["error"]:
        return "error"
    text = f"{record['median_us']:.1f} [{record['p10_us']:.1f}–{record['p90_us']:.1f}]"
    if record.get("ratio_to_baseline") is not None and record["target"] not in BASELINES:
        text += f" ×{record['ratio_to_baseline']:.2f}"
    return text + ("" if record["correct"] else " ✗")


def _eager_small_message(results: list[dict], meta: dict) -> str:
    """The eager host-side cost per call of each target at the smallest size, vs the baseline."""
    eager = [r for r in results if r["mode"] == "eager" and r.get("host_us_per_call") is not None]
    if not eager:
        return ""
    parts = []
    for dtype in meta["config"]["dtypes"]:
        rows = [r for r in eager if r["dtype"] == dtype]
        if not rows:
            continue
        smallest = min(r["size"] for r in rows)
        order = _targets(rows)
        rows = sorted((r for r in rows if r["size"] == smallest), key=lambda r: order.index(r["target"]))
        base = next((r for r in rows if r["target"] == meta["baseline"]), None)
        for r in rows:
            ratio = (f" (×{r['host_us_per_call'] / base['host_us_per_call']:.2f})"
                     if base and r is not base else "")
            parts.append(f"- {dtype} {size_text(smallest)}, `{r['target']}`: "
                         f"{r['host_us_per_call']:.1f} µs per call on the host{ratio}")
    return "\n".join(parts)


def plot(summary: dict, path: Path) -> Optional[str]:
    """Write a log-log latency plot; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'distrib[bench]')"
    meta, results = summary["meta"], summary["results"]
    panels = [(m, d) for m in meta["config"]["modes"] for d in meta["config"]["dtypes"]]
    columns = len(meta["config"]["dtypes"])
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    for axis, (mode, dtype) in zip(axes.flat, panels):
        for target in _targets(results):
            points = sorted((r["size"], r["median_us"], r["p10_us"], r["p90_us"]) for r in results
                            if r["target"] == target and r["mode"] == mode and r["dtype"] == dtype
                            and r.get("median_us"))
            if not points:
                continue
            sizes, medians, low, high = zip(*points)
            line, = axis.plot(sizes, medians, marker="o", markersize=3, label=target,
                              linestyle="--" if target.startswith("torch:") else "-")
            axis.fill_between(sizes, low, high, alpha=0.15, color=line.get_color())
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("message size (bytes)")
        axis.set_ylabel("µs per all-reduce (median)")
        axis.set_title(f"{'CUDA graph' if mode == 'graph' else 'eager'}, {dtype}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"all-reduce, {meta['nprocs']} × {meta['device_name']} — {meta['date'][:10]}, "
                    f"{meta['commit'][:12]}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
