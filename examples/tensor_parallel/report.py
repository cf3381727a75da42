"""The example's outputs: a JSON record, a console table, a markdown table, a plot.

Per communicator and batch size: the median time of one decode step (every
layer plus the LM head, one new token per sequence, so it is the per-token
latency; with pipeline stages, every stage in turn), tokens/s = batch / latency, and the ratio to torch.distributed's
time at the same batch size (below 1: faster than torch). Memory added by
capturing the graphs, per communicator, in one table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["summarize", "console", "markdown", "plot", "write"]

TARGET_BATCH = 8          # the target: at batch <= 8 ...
TARGET_RATIO = 0.92       # ... at least 8% lower latency than torch.distributed NCCL, ...
TARGET_CONFIG = ("llama-70b", 4, "H200")  # ... for this model on 4 x H200, never worse anywhere


def summarize(meta: dict, record: dict) -> dict:
    """Rank 0's record plus the run's facts -> the JSON document (ratios and the target added)."""
    results = record["results"]
    baseline = next((r["comm"] for r in results if r["comm"].startswith("torch:")), None)
    reference = {r["batch"]: r["latency_ms"] for r in results if r["comm"] == baseline}
    for r in results:
        r["tokens_per_s"] = r["batch"] / (r["latency_ms"] / 1e3) if r["latency_ms"] > 0 else None
        ref = reference.get(r["batch"])
        r["ratio_vs_torch"] = r["latency_ms"] / ref if ref else None
    meta = {**meta, "device_name": record["facts"]["device_name"], "tp": record["tp"], "pp": record.get("pp", 1),
            "stages": record.get("stages"),
            "versions": {k: v for k, v in record["facts"].items() if k != "device_name"},
            "model": record["shape"], "layers": record["shape"]["layers"], "layers_note": record["layers_note"],
            "model_note": record.get("model_note"),
            "baseline": baseline, "contenders": record["contenders"], "skipped": record["skipped"]}
    for label, details in record["contenders"].items():
        if details.get("nccl"):
            meta["versions"][f"NCCL ({label})"] = details["nccl"]
    return {"meta": meta, "check": record["check"], "results": results, "memory": record["memory"],
            "target": _target(meta, results, baseline)}


def _target(meta: dict, results: list, baseline: Optional[str]) -> Optional[dict]:
    ours = {r["batch"]: r["ratio_vs_torch"] for r in results if r["comm"] == "distrib:dispatcher"}
    if baseline is None or not ours:
        return None
    small = {b: x for b, x in ours.items() if b <= TARGET_BATCH}
    model, tp, gpu = TARGET_CONFIG
    return {"description": f"dispatcher vs {baseline}: per-token latency at batch <= {TARGET_BATCH} at least "
                           f"{(1 - TARGET_RATIO) * 100:.0f}% lower, and never higher at any batch size",
            "applies": (meta["model"]["name"] == model and meta["tp"] == tp and meta["pp"] == 1
                        and gpu in meta["device_name"]),
            "lower_pct": {str(b): (1 - x) * 100 for b, x in sorted(ours.items())},
            "small_batches_met": bool(small) and all(x <= TARGET_RATIO for x in small.values()),
            "never_worse": all(x <= 1.0 for x in ours.values())}


# -- tables ---------------------------------------------------------------------------------

def _order(summary: dict) -> list[str]:
    labels = list(dict.fromkeys(r["comm"] for r in summary["results"]))
    return sorted(labels, key=lambda c: (c != summary["meta"]["baseline"], c != "distrib:nccl", c))


def _latency_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    labels, baseline = _order(summary), summary["meta"]["baseline"]
    header = ["batch"]
    for label in labels:
        header += [label] + ([] if label == baseline or baseline is None else ["× torch"])
    rows = []
    for batch in sorted({r["batch"] for r in summary["results"]}):
        row = [str(batch)]
        for label in labels:
            r = next((r for r in summary["results"] if r["comm"] == label and r["batch"] == batch), None)
            row.append("–" if r is None else f"{r['latency_ms']:.3f} ms · {r['tokens_per_s']:,.0f} tok/s")
            if label != baseline and baseline is not None:
                row.append("–" if r is None or r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.3f}")
        rows.append(row)
    return header, rows


def _memory_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["communicator", "graphs", "all-reduces captured", "steady added", "peak added",
              "per graph", "of which torch pool"]
    rows = [[m["comm"], str(m["graphs"]), str(m["captured_all_reduces"]), f"{m['steady_added_mib']:.0f} MiB",
             f"{m['peak_added_mib']:.0f} MiB", f"{m['steady_added_mib'] / max(1, m['graphs']):.0f} MiB",
             f"{m['torch_pool_added_mib']:.0f} MiB"] for m in summary["memory"]]
    return header, rows


def _split(m: dict) -> str:
    if m.get("pp", 1) == 1:
        return f"TP={m['tp']}"
    return f"TP={m['tp']} × PP={m['pp']} (stage layers {m['stages']})"


def _title(summary: dict) -> str:
    m = summary["meta"]
    gpus = m.get("gpus") or m["tp"] * m.get("pp", 1)
    return (f"Tensor-parallel decode: {m['model']['name']}, {m['layers_note']}, {_split(m)} on "
            f"{gpus} × {m['device_name']}" + (" (ranks share it)" if m.get("shared_gpu") else ""))


def _method(summary: dict) -> str:
    m = summary["meta"]
    return (f"{m['timing']}; median of {m['steps']} steps of the slowest rank; batch of B sequences, one new token "
            f"each, {m['model']['context']} tokens in the KV cache; bf16, random weights. "
            "× torch: latency ratio to torch.distributed (below 1 is faster).")


def _check_lines(summary: dict) -> list[str]:
    check = summary["check"]
    lines = [f"Logits check before timing: {'passed' if check['passed'] else 'FAILED'} "
             f"(reference `{check['reference']}`, relative-error tolerance {check['rtol']:g}; "
             f"largest |logit| {check['max_abs_logit']:.3g})."]
    for label in dict.fromkeys(c["comm"] for c in check["logits"]):
        rows = [c for c in check["logits"] if c["comm"] == label]
        lines.append(f"- `{label}`: max relative error {max(c['rel_err'] for c in rows):.3g}, max |diff| "
                     f"{max(c['max_abs_diff'] for c in rows):.3g} over batches "
                     f"{', '.join(str(c['batch']) for c in rows)}")
    exact = ", ".join(f"`{k}` {'exact' if v else 'WRONG'}" for k, v in check["exact_all_reduce"].items())
    lines.append(f"- all-reduce of every decode shape, exact sums: {exact}")
    if check.get("vs_tp1"):
        worst = max(r["rel_err"] for r in check["vs_tp1"])
        lines.append(f"- against one unsplit model (TP=1, PP=1) on rank 0: max relative error {worst:.3g} over "
                     f"batches {', '.join(str(r['batch']) for r in check['vs_tp1'])}")
    if check["graph_vs_eager"]:
        worst = max(c["rel_err"] for c in check["graph_vs_eager"])
        lines.append(f"- CUDA graphs vs eager steps: max relative error {worst:.3g}")
    return lines


def _target_line(summary: dict) -> Optional[str]:
    t = summary["target"]
    if t is None:
        return None
    lower = ", ".join(f"B={b}: {p:+.1f}%" for b, p in t["lower_pct"].items())
    verdict = "met" if t["small_batches_met"] and t["never_worse"] else "NOT met"
    where = "" if t["applies"] else " (the target is set for llama-70b on 4 × H200; this run is another setup)"
    return f"Target — {t['description']}: {verdict}{where}. Latency lower than torch by: {lower}."


def console(summary: dict) -> str:
    """A plain-text report for the terminal."""
    out = [_title(summary), _method(summary), ""]
    out += _text_table(*_latency_rows(summary))
    if summary["memory"]:
        out += ["", "GPU memory added by capturing the graphs (largest over ranks):"]
        out += _text_table(*_memory_rows(summary))
    out += [""] + _check_lines(summary)
    target = _target_line(summary)
    if target and summary["meta"]["device"] == "cuda":
        out += ["", target]
    out += [""] + _communicator_lines(summary)
    return "\n".join(out)


def markdown(summary: dict) -> str:
    m = summary["meta"]
    out = [f"# {_title(summary)}", "",
           f"{m['date']} · commit `{m['commit']}` · " + " · ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
           "", _method(summary), "", "## Per-token latency and throughput", ""]
    out += _markdown_table(*_latency_rows(summary))
    target = _target_line(summary)
    if target:
        out += ["", target]
    if summary["memory"]:
        out += ["", "## GPU memory added by CUDA-graph capture", "",
                "Device memory in use (`cudaMemGetInfo`, so NCCL's and CuPy's own allocations count), relative to "
                "just before the first capture, largest over ranks: steady = every graph captured and replayed; "
                "peak = the largest sample taken after each capture; per graph = steady / graphs; torch pool = the "
                "part in PyTorch's caching allocator (the graphs' shared pool). The JSON keeps the memory after "
                "each capture, largest batch first (`after_each_capture_mib`).", ""]
        out += _markdown_table(*_memory_rows(summary))
    out += ["", "## Checks", ""] + _check_lines(summary)
    out += ["", "## Communicators", ""] + [f"- {line}" for line in _communicator_lines(summary)]
    return "\n".join(out) + "\n"


def _communicator_lines(summary: dict) -> list[str]:
    """What each contender was: the dispatcher's chain, what it left out and why, versions."""
    m, lines = summary["meta"], []
    for label, details in m["contenders"].items():
        parts = []
        if details.get("chain"):
            parts.append(("TP chain " if details.get("pipeline_chain") else "chain ") + " > ".join(details["chain"]))
        if details.get("pipeline_chain"):
            parts.append("pipeline chain " + " > ".join(details["pipeline_chain"]))
        if details.get("tp"):
            parts.append(details["tp"])
        if details.get("groups"):
            parts.append(details["groups"])
        if details.get("nccl"):
            parts.append(f"NCCL {details['nccl']}")
        parts += [f"{name} left out ({why})" for name, why in details.get("left_out", {}).items()]
        parts += [f"{name} left out of the pipeline group ({why})"
                  for name, why in details.get("pipeline_left_out", {}).items()]
        if details.get("timing"):
            parts.append(details["timing"])
        if details.get("broken"):
            parts.append(details["broken"])
        lines.append(f"`{label}`: " + ("; ".join(parts) or "default process group"))
    lines += [f"`{label}`: not run ({why})" for label, why in m["skipped"].items()]
    return lines


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


# -- plot ------------------------------------------------------------------------------------

def plot(summary: dict, path: Path) -> Optional[str]:
    """Latency and ratio to torch against batch size (and memory added by capture, when measured).

    Returns why not when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        return "matplotlib is not installed (pip install 'distrib[bench]')"
    m, labels = summary["meta"], _order(summary)
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # one colour per communicator, every panel
    panels = 3 if summary["memory"] else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.6))
    latency, ratio = axes[0], axes[1]
    batches = sorted({r["batch"] for r in summary["results"]})
    for label in labels:
        rows = sorted((r for r in summary["results"] if r["comm"] == label), key=lambda r: r["batch"])
        x = [r["batch"] for r in rows]
        style = dict(color=colors[label], marker="o", linestyle="--" if label.startswith("torch:") else "-")
        latency.plot(x, [r["latency_ms"] for r in rows], label=label, **style)
        latency.fill_between(x, [r["p10_ms"] for r in rows], [r["p90_ms"] for r in rows], color=colors[label],
                             alpha=0.15)
        if label != m["baseline"] and m["baseline"] is not None:
            ratio.plot(x, [r["ratio_vs_torch"] for r in rows], label=label, **style)
    latency.set_ylabel("ms per decode step (= per token)")
    latency.set_title("per-token latency (median, p10–p90)", fontsize=10)
    ratio.set_ylabel(f"latency / {m['baseline']}")
    ratio.set_title("ratio to torch.distributed (below 1: faster)", fontsize=10)
    ratio.axhline(1.0, color="gray", linewidth=1)
    if summary["target"] is not None:
        ratio.axhline(TARGET_RATIO, color="gray", linewidth=1, linestyle=":", label="target at batch ≤ 8")
    for axis in (latency, ratio):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_locator(FixedLocator(batches))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels([str(b) for b in batches])
        axis.set_xlabel("batch size (sequences, one new token each)")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # the ratio panel is empty when torch did not run
            axis.legend(fontsize=8)
    if summary["memory"]:
        memory = axes[2]
        names = [row["comm"] for row in summary["memory"]]
        x = range(len(names))
        memory.bar([i - 0.2 for i in x], [row["steady_added_mib"] for row in summary["memory"]], width=0.4,
                   color=[colors.get(n, "gray") for n in names], label="steady")
        memory.bar([i + 0.2 for i in x], [row["peak_added_mib"] for row in summary["memory"]], width=0.4,
                   color=[colors.get(n, "gray") for n in names], alpha=0.45, label="peak")
        memory.set_xticks(list(x))
        memory.set_xticklabels(names, fontsize=8)
        memory.set_ylabel("MiB added by capture")
        graphs = summary["memory"][0]["graphs"]
        memory.set_title(f"GPU memory added by {graphs} graphs ({summary['memory'][0]['captured_all_reduces']} "
                         "all-reduces)", fontsize=10)
        memory.legend(fontsize=8)
        memory.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"{m['model']['name']} ({m['layers']} layers), {_split(m)}, "
                    f"{m.get('gpus') or m['tp'] * m.get('pp', 1)} × {m['device_name']} "
                    f"— {m['date'][:10]}, {m['commit'][:12]}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def write(summary: dict, out: Path) -> list[str]:
    """Write ``tp-decode-<model>.{json,md,png}`` under ``out``; returns lines saying what was written."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tp-decode-{summary['meta']['model']['name']}"
    json_path, md_path, png_path = (out / f"{stem}{suffix}" for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    md_path.write_text(markdown(summary))
    why_not = plot(summary, png_path)
    return [f"wrote {json_path}", f"wrote {md_path}",
            f"wrote {png_path}" if why_not is None else f"no plot: {why_not}"]
