"""The tensor-parallel decode example (examples/tensor_parallel_decode.py) on CPU ranks, so it cannot rot.

- the split is right: a TP=2 model, and TP=2 x PP=2 and TP=1 x PP=3
  pipelines, compute what the TP=1 model computes (ranks as threads here,
  summing through a shared list, passing hidden states through queues);
- a smoke run on 2 CPU ranks (gloo, tiny model) checks the communicators
  against each other, times them, and writes its record; so does one on 4
  ranks as TP=2 x PP=2, checked against the unsplit model;
- the check can fail: a communicator whose all-reduce is a no-op stops the
  run, and so does a pipeline stage that sends zeros;
- by default the record goes under the current directory, never into the
  repository; a missing matplotlib is said once, with the install hint;
- where ranks share a GPU, the model is the largest that fits in its free
  memory (a pure choice, tested here with the byte counts of an H100 and an
  H200; never run on a GPU by these tests), and a named one that does not fit
  is an error naming the sizes.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPT = EXAMPLES / "tensor_parallel_decode.py"


@pytest.fixture(scope="module")
def model():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tensor_parallel import model
        yield model
    finally:
        sys.path.remove(str(EXAMPLES))


class _ThreadRanks:
    """``tp`` ranks as threads; ``all_reduce(rank)`` sums every rank's tensor in float32."""

    def __init__(self, tp: int):
        self.barrier = threading.Barrier(tp, timeout=60)
        self.slots: list = [None] * tp

    def all_reduce(self, rank: int):
        def reduce(t):
            self.slots[rank] = t
            self.barrier.wait()
            total = sum(s.float() for s in self.slots).to(t.dtype)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total
        return reduce


def _logits(model, shape, tp: int, batch: int, pp: int = 1, zeros_from: int = -1):
    """The last stage's logits of a TP x PP run, ranks as threads (stage ``zeros_from`` sends zeros)."""
    import torch

    groups = [_ThreadRanks(tp) for _ in range(pp)]  # one TP group per stage
    mailboxes = {(a, b): queue.Queue() for a in range(tp * pp) for b in range(tp * pp)}
    outputs, errors = [None] * (tp * pp), []

    def run(rank: int) -> None:
        tp_rank, index = rank % tp, rank // tp  # TP innermost, as distrib.parallel.layout
        stage = model.pipeline_stage(shape.layers, pp, index)
        pipeline = [s * tp + tp_rank for s in range(pp)]  # global ranks, by stage

        def send(t, dst: int) -> None:
            mailboxes[rank, pipeline[dst]].put(torch.zeros_like(t) if index == zeros_from else t.clone())

        def recv(t, src: int):
            return t.copy_(mailboxes[pipeline[src], rank].get(timeout=60))

        try:
            weights = model.DecoderWeights(shape, tp, tp_rank, batch, torch.device("cpu"), seed=3, stage=stage)
            decoder = model.TensorParallelDecoder(weights)
            x = model.decode_inputs(shape, batch, torch.device("cpu"), seed=3)
            all_reduce = groups[index].all_reduce(tp_rank)
            outputs[rank] = model.run_stage(stage, lambda h: decoder.step(h, all_reduce), x, send, recv)
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test's thread
            errors.append(exc)
            for group in groups:
                group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp * pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(o is None for o in outputs[:-tp])  # only the last stage has logits
    return torch.cat(outputs[-tp:], dim=-1).float()  # vocabulary shards in TP-rank order


def test_a_tensor_parallel_split_computes_what_one_rank_computes(model):
    shape = model.SHAPES["tiny"]
    whole = _logits(model, shape, 1, batch=3)
    split = _logits(model, shape, 2, batch=3)
    assert whole.shape == split.shape == (3, shape.vocab)
    # Only the rounding of the partial sums differs (bf16): ~1% of the logits' norm.
    assert ((split - whole).norm() / whole.norm()).item() < 0.03
    # ... and a wrong split would not pass: another seed's weights are far off.
    assert ((_logits_other_seed(model, shape) - whole).norm() / whole.norm()).item() > 0.5


def test_a_pipeline_of_tensor_parallel_stages_computes_what_one_rank_computes(model):
    shape = model.SHAPES["tiny"]
    whole = _logits(model, shape, 1, batch=3)
    for tp, pp in ((2, 2), (1, 3)):  # 4 layers in 3 stages: 1, 1, 2 (an uneven split)
        split = _logits(model, shape, tp, batch=3, pp=pp)
        assert split.shape == (3, shape.vocab)
        assert ((split - whole).norm() / whole.norm()).item() < 0.03, (tp, pp)
    # ... and a stage that hands on zeros instead of its hidden state is far off.
    broken = _logits(model, shape, 2, batch=3, pp=2, zeros_from=0)
    assert ((broken - whole).norm() / whole.norm()).item() > 0.5


def test_stages_hold_contiguous_layers_with_the_unsplit_models_weights(model):
    import torch

    assert [model.pipeline_stage(5, 2, s).layers for s in range(2)] == [range(0, 2), range(2, 5)]
    assert [model.pipeline_stage(4, 4, s).layers for s in range(4)] == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="cannot be cut into 3 pipeline stages"):
        model.pipeline_stage(2, 3, 0)
    shape, cpu = model.SHAPES["tiny"], torch.device("cpu")
    whole = model.DecoderWeights(shape, 2, 1, 2, cpu)
    last = model.DecoderWeights(shape, 2, 1, 2, cpu, stage=model.pipeline_stage(shape.layers, 2, 1))
    first = model.DecoderWeights(shape, 2, 1, 2, cpu, stage=model.pipeline_stage(shape.layers, 2, 0))
    assert len(last.layers) == len(first.layers) == 2 and first.lm_head is None
    assert torch.equal(last.layers[0].qkv, whole.layers[2].qkv) and torch.equal(last.lm_head, whole.lm_head)
    assert torch.equal(last.layers[1].cache_v, whole.layers[3].cache_v)


def _logits_other_seed(model, shape):
    import torch

    weights = model.DecoderWeights(shape, 1, 0, 3, torch.device("cpu"), seed=4)
    x = model.decode_inputs(shape, 3, torch.device("cpu"), seed=3)
    return model.TensorParallelDecoder(weights).step(x, lambda t: t).float()


def test_shapes_that_cannot_be_split_are_refused(model):
    assert model.SHAPES["llama-70b"].problem_with(4) is None
    assert model.SHAPES["llama-8b"].problem_with(2) is None
    assert "divide" in model.SHAPES["tiny"].problem_with(3)
    with pytest.raises(ValueError, match="cannot be split 3 ways"):
        model.DecoderWeights(model.SHAPES["tiny"], 3, 0, 1, "cpu")


def _run_example(tmp_path: Path, *extra: str, out: bool = True) -> subprocess.CompletedProcess:
    """The example on 2 CPU ranks, run from ``tmp_path``; its record in ``tmp_path`` (``out``) or where it chooses."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--nprocs", "2", "--model", "tiny",
         "--batch-sizes", "1,4", "--steps", "3", "--warmup", "1", *(["--out", str(tmp_path)] if out else []),
         "--commit", "test-commit", *extra],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)


def _files_under(*folders: Path) -> set:
    return {p for folder in folders for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_cpu_smoke_run_checks_times_and_writes_its_record(tmp_path):
    in_repo = _files_under(REPO / "benchmarks", EXAMPLES)
    result = _run_example(tmp_path, out=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without --out: under the current directory (here tmp_path), said so; nothing new in the repository.
    out = tmp_path / "tp-decode-results" / "2xCPU"
    assert f"[tp-decode] results in {out} (--out chooses another folder)" in result.stderr
    assert _files_under(REPO / "benchmarks", EXAMPLES) == in_repo
    assert {p.name for p in _files_under(tmp_path)} >= {"tp-decode-results", "2xCPU", "tp-decode-tiny.json"}
    tmp_path = out
    summary = json.loads((tmp_path / "tp-decode-tiny.json").read_text())
    meta, check = summary["meta"], summary["check"]
    assert meta["commit"] == "test-commit" and meta["tp"] == 2 and meta["device"] == "cpu"
    assert meta["model"]["name"] == "tiny" and meta["layers"] == 4 and meta["baseline"] == "torch:gloo"
    assert "no CUDA graphs" in meta["timing"]
    assert "needs CUDA" in meta["skipped"]["distrib:nccl"]
    # The check compared the dispatcher's logits with torch's, at every batch size, and passed.
    assert check["passed"] is True and check["reference"] == "torch:gloo"
    assert [(c["comm"], c["batch"]) for c in check["logits"]] == [("distrib:dispatcher", 1), ("distrib:dispatcher", 4)]
    assert all(c["rel_err"] <= check["rtol"] and c["finite"] for c in check["logits"])
    assert check["exact_all_reduce"] == {"distrib:dispatcher": True, "torch:gloo": True}
    rows = {(r["comm"], r["batch"]): r for r in summary["results"]}
    assert set(rows) == {(c, b) for c in ("distrib:dispatcher", "torch:gloo") for b in (1, 4)}
    for r in rows.values():
        assert r["steps"] == 3 and 0 < r["p10_ms"] <= r["latency_ms"] <= r["p90_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["latency_ms"] * 1e3)
    assert rows[("torch:gloo", 4)]["ratio_vs_torch"] == pytest.approx(1.0)
    assert summary["memory"] == []  # measured on GPUs only
    table = (tmp_path / "tp-decode-tiny.md").read_text()
    assert "| batch | torch:gloo | distrib:dispatcher | × torch |" in table and "Logits check" in table
    assert "× torch" in result.stdout and "Logits check before timing: passed" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # Said once, with the extra that installs it; no traceback.
        assert result.stderr.count("matplotlib") == 1 and "Traceback" not in result.stderr
        assert "no plot: matplotlib is not installed (pip install 'distrib[bench]')" in result.stderr
    else:
        assert (tmp_path / "tp-decode-tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_the_logits_check_stops_a_communicator_that_does_not_reduce(tmp_path):
    result = _run_example(tmp_path, "--break-comm", "dispatcher")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "logits check FAILED, nothing was timed" in result.stderr
    assert "distrib:dispatcher vs torch:gloo at batch 1" in result.stderr
    assert not (tmp_path / "tp-decode-tiny.json").exists()


def test_the_compiled_decode_step_gives_the_same_logits(tmp_path):
    result = _run_example(tmp_path, "--compile", "aot_eager", "--batch-sizes", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "tp-decode-tiny.json").read_text())
    meta, check = summary["meta"], summary["check"]
    assert meta["compile"] == "aot_eager" and meta["timing"].startswith("compiled (torch.compile, aot_eager)")
    # Both contenders' all-reduces were compiled (fullgraph: no graph break allowed) and agree.
    assert check["passed"] is True and check["exact_all_reduce"] == {"distrib:dispatcher": True, "torch:gloo": True}
    assert [(c["comm"], c["batch"]) for c in check["logits"]] == [("distrib:dispatcher", 2)]
    assert all(c["rel_err"] <= check["rtol"] for c in check["logits"])


def test_the_split_model_is_checked_against_one_unsplit_model(tmp_path):
    result = _run_example(tmp_path, "--check-tp1", "--comm", "dispatcher")
    assert result.returncode == 0, result.stdout + result.stderr
    check = json.loads((tmp_path / "tp-decode-tiny.json").read_text())["check"]
    assert [r["batch"] for r in check["vs_tp1"]] == [1, 4]
    # Only the rounding of the partial sums differs (bf16): ~1% of the logits' norm.
    assert all(r["finite"] and 0 < r["rel_err"] < 0.03 for r in check["vs_tp1"]), check["vs_tp1"]
    assert "vs one unsplit model (TP=1)" in result.stderr


def test_a_pipelined_cpu_run_matches_the_unsplit_model(tmp_path):
    result = _run_example(tmp_path, "--nprocs", "4", "--pp", "2", "--check-tp1")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "tp-decode-tiny.json").read_text())
    meta, check = summary["meta"], summary["check"]
    assert (meta["tp"], meta["pp"], meta["stages"]) == (2, 2, "0-1, 2-3")
    assert meta["timing"].startswith("whole pipelined steps (2 stages in turn")
    # Both contenders ran the pipeline, agree, and agree with the unsplit model (TP=1, PP=1).
    assert check["passed"] is True and check["reference"] == "torch:gloo"
    assert check["exact_all_reduce"] == {"distrib:dispatcher": True, "torch:gloo": True}
    assert [(c["comm"], c["batch"]) for c in check["logits"]] == [("distrib:dispatcher", 1), ("distrib:dispatcher", 4)]
    assert [r["batch"] for r in check["vs_tp1"]] == [1, 4]
    assert all(r["finite"] and 0 < r["rel_err"] < 0.03 for r in check["vs_tp1"]), check["vs_tp1"]
    assert "(TP=2 x PP=2) vs one unsplit model (TP=1, PP=1)" in result.stderr
    assert {(r["comm"], r["batch"]) for r in summary["results"]} == {
        (c, b) for c in ("distrib:dispatcher", "torch:gloo") for b in (1, 4)}
    assert all(r["steps"] == 3 and r["latency_ms"] > 0 for r in summary["results"])
    assert "pipeline chain gloo" in result.stdout and "TP=2 × PP=2" in result.stdout


def test_the_check_stops_a_pipeline_stage_that_sends_zeros(tmp_path):
    result = _run_example(tmp_path, "--nprocs", "4", "--pp", "2", "--check-tp1", "--comm", "dispatcher",
                          "--break-handoff", "dispatcher")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "logits check against one unsplit model (TP=1, PP=1) FAILED, nothing was timed" in result.stderr
    assert not (tmp_path / "tp-decode-tiny.json").exists()


def test_pipeline_sizes_that_do_not_fit_are_refused(model):  # the fixture puts examples/ on sys.path
    import tensor_parallel_decode as script

    for extra, message in ((("--nprocs", "4", "--pp", "3"), "--pp 3 does not divide the 4 ranks"),
                           (("--pp", "2", "--layers", "1"), "1 layers cannot be cut into 2 stages"),
                           (("--break-handoff", "torch"), "needs --pp 2 or more")):
        with pytest.raises(SystemExit, match=message):
            script.config_from(script.build_parser().parse_args(["--device", "cpu", *extra]), None)
    assert script.config_from(script.build_parser().parse_args(["--device", "cpu", "--pp", "2"]),
                              None)["nprocs"] == 4  # CPU default: TP=2 per stage


def test_shared_gpus_are_for_gpus():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--devices", "0,0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--devices names GPUs" in result.stderr


# -- a missing matplotlib ---------------------------------------------------------------

def test_without_matplotlib_the_record_is_written_and_the_plot_skipped_once(model, monkeypatch, tmp_path):
    from tensor_parallel import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError
    monkeypatch.setattr(report, "markdown", lambda summary: "table\n")
    lines = report.write({"meta": {"model": {"name": "tiny"}}}, tmp_path)
    assert lines == [f"wrote {tmp_path / 'tp-decode-tiny.json'}", f"wrote {tmp_path / 'tp-decode-tiny.md'}",
                     "no plot: matplotlib is not installed (pip install 'distrib[bench]')"]
    assert not (tmp_path / "tp-decode-tiny.png").exists()


# -- the model that fits where ranks share a GPU ---------------------------------------------

def _gpu(fit, free_gib: float, total_gib: float, ranks: int, unsplit: bool = True):
    return fit.Gpu(free=int(free_gib * fit.GIB), total=int(total_gib * fit.GIB), ranks=ranks, unsplit=unsplit,
                   name="GPU 0")


@pytest.fixture
def fit(model):
    from tensor_parallel import fit
    return fit


def test_what_a_gpu_must_hold_counts_every_rank_on_it_and_the_unsplit_model(model, fit):
    shape, gib = model.SHAPES["llama-70b"], fit.GIB
    per_layer, head = shape.bytes_per_rank(2, 64)
    whole_layer, whole_head = shape.bytes_per_rank(1, 64)
    alone = fit.needed(shape, 80, 2, 1, 64, _gpu(fit, 78.5, 79.2, ranks=1, unsplit=False))
    assert alone == 80 * per_layer + head + 8 * gib  # 8 GiB kept free per rank (6 % of 79 GiB is less)
    shared = fit.needed(shape, 80, 2, 1, 64, _gpu(fit, 78.5, 79.2, ranks=2))
    assert shared == 2 * alone + 80 * whole_layer + whole_head
    # A stage holds ceil(L / pp) layers: 41 of 81 in two stages.
    assert fit.needed(shape, 81, 2, 2, 64, _gpu(fit, 78.5, 79.2, ranks=1, unsplit=False)) == \
        41 * per_layer + head + 8 * gib
    assert fit.reserve(int(141 * gib)) == int(0.06 * int(141 * gib))  # an H200: 8.5 GiB


def test_ranks_sharing_an_h100_get_the_largest_model_that_fits(model, fit):
    # What killed the example: 2 ranks on one 80 GB H100, each building 39 GiB of llama-70b.
    h100 = _gpu(fit, 78.5, 79.2, ranks=2)
    chosen = fit.choose(model.SHAPES, None, None, 2, 1, 64, [h100])
    assert (chosen.shape.name, chosen.shape.layers) == ("llama-8b", 32)
    assert fit.needed(chosen.shape, 32, 2, 1, 64, h100) <= h100.free
    assert chosen.layers_note == "32 of 32 layers (all)"
    assert chosen.model_note.startswith("llama-8b, the largest model whose 32 layers fit (llama-70b would need ")
    assert "of the 78.5 GiB free on GPU 0 (shared by 2 ranks)); --model names another" in chosen.model_note
    # So on one shared 141 GB H200 (llama-70b's unsplit model alone is 140 GiB), at TP=2 x PP=2 too.
    h200 = _gpu(fit, 139.5, 140.0, ranks=4)
    assert fit.choose(model.SHAPES, None, None, 2, 2, 64, [h200]).shape.name == "llama-8b"
    # Without the unsplit model and with room for it all: llama-70b; with little room: tiny.
    assert fit.choose(model.SHAPES, None, None, 2, 1, 64, [_gpu(fit, 400, 400, 2, unsplit=False)]).shape.name \
        == "llama-70b"
    small = fit.choose(model.SHAPES, None, None, 2, 1, 64, [_gpu(fit, 20, 24, ranks=2)])
    assert (small.shape.name, small.shape.layers) == ("tiny", 4)
    assert "llama-8b would need" in small.model_note  # the next larger one, passed over


def test_when_no_model_fits_whole_the_smallest_gets_the_layers_that_fit(model, fit):
    # 8 ranks at TP=8 on one H100: tiny cannot be split 8 ways; llama-8b gets what fits.
    chosen = fit.choose(model.SHAPES, None, None, 8, 1, 64, [_gpu(fit, 78.5, 79.2, ranks=8)])
    assert chosen.shape.name == "llama-8b" and 1 <= chosen.shape.layers < 32
    assert chosen.model_note.startswith("llama-8b, the smallest model that splits 8 ways")
    assert chosen.layers_note.startswith(f"{chosen.shape.layers} of 32 layers: limited by GPU memory (78.5 GiB "
                                         "free on GPU 0 (shared by 8 ranks)")
    with pytest.raises(fit.DoesNotFit, match="none of the models .* can be split 3 ways"):
        fit.choose(model.SHAPES, None, None, 3, 1, 64, [_gpu(fit, 78.5, 79.2, ranks=3)])


def test_a_named_model_gets_the_layers_that_fit_or_a_clear_error(model, fit):
    h100 = _gpu(fit, 78.5, 79.2, ranks=2)
    cut = fit.choose(model.SHAPES, "llama-70b", None, 2, 1, 64, [h100])
    assert cut.model_note is None and 1 < cut.shape.layers < 80
    assert fit.needed(cut.shape, cut.shape.layers, 2, 1, 64, h100) <= h100.free \
        < fit.needed(cut.shape, cut.shape.layers + 1, 2, 1, 64, h100)
    assert cut.layers_note.startswith(f"{cut.shape.layers} of 80 layers: limited by GPU memory")
    assert fit.choose(model.SHAPES, "llama-8b", 8, 2, 1, 64, [h100]).layers_note == "8 of 32 layers (--layers 8)"
    # No GPUs (CPU ranks): no memory limit.
    assert fit.choose(model.SHAPES, "llama-70b", None, 2, 1, 64, []).shape.layers == 80
    # Not even one layer per stage: an error that names --model and the sizes.
    with pytest.raises(fit.DoesNotFit) as error:
        fit.choose(model.SHAPES, "llama-70b", None, 2, 4, 64, [_gpu(fit, 78.5, 79.2, ranks=8)])
    message = str(error.value)
    assert message.startswith("--model llama-70b does not fit: even one layer per pipeline stage needs ")
    assert "on GPU 0 (shared by 8 ranks) (8 ranks x (0.88 GiB per layer with its KV cache + 0.98 GiB of LM " \
           "head + 8.0 GiB kept free) + " in message
    assert "for the unsplit model of the TP=1 check on rank 0), and 78.5 GiB is free. Name a smaller --model" \
        in message


def test_the_ranks_gather_what_each_gpu_has_free_and_agree(model, fit, monkeypatch):
    import torch
    from tensor_parallel import measure

    gib = fit.GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(78.5 * gib), int(79.2 * gib)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="GPU-1234"))

    class World:  # 4 ranks: 0 and 1 on this GPU, 2 and 3 on GPU 1, with less free
        rank, node_rank, nnodes = 0, 0, 1

        def __init__(self, other_free_gib: float):
            self.other_free = int(other_free_gib * gib)

        def all_gather(self, data: bytes) -> list:
            mine = json.loads(data)
            other = dict(mine, gpu="0/GPU-5678", name="GPU 1", free=self.other_free)
            return [json.dumps(dict(row, rank=r)).encode() for r, row in enumerate((mine, mine, other, other))]

    gpus = fit.gpus_from([json.loads(r) for r in World(60).all_gather(json.dumps(
        {"gpu": "0/GPU-1234", "name": "GPU 0", "free": 5, "total": 9}).encode())], unsplit_rank=0)
    assert [(g.name, g.ranks, g.free, g.unsplit) for g in gpus] == [("GPU 0", 2, 5, True),
                                                                    ("GPU 1", 2, int(60 * gib), False)]
    config, cuda = {"model": None, "layers": None, "check_tp1": True}, torch.device("cuda", 0)
    assert measure._fit(config, 2, 2, 64, cuda, World(60)).shape.name == "llama-8b"
    # What does not fit raises the same error on every rank, before any builds its part of the model.
    with pytest.raises(fit.DoesNotFit, match=r"^tiny does not fit: .* on GPU 1 \(shared by 2 ranks\)"):
        measure._fit(config, 2, 2, 64, cuda, World(12))
    with pytest.raises(fit.DoesNotFit, match=r"^--model llama-70b does not fit: .* on GPU 1 "):
        measure._fit({**config, "model": "llama-70b"}, 2, 2, 64, cuda, World(12))


def test_ranks_sharing_a_gpu_get_no_default_model(model, monkeypatch):
    import torch
    import tensor_parallel_decode as script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def config(*argv: str, share: str = "") -> dict:
        monkeypatch.setenv("DISTRIB_SHARE_GPU", share)
        return script.config_from(script.build_parser().parse_args(["--device", "cuda", *argv]), 2)

    assert config()["model"] == "llama-70b"            # a GPU per rank: the default
    assert config(share="2")["model"] is None           # distrib-run --share-gpu: the ranks choose
    assert config("--model", "llama-8b", share="2")["model"] == "llama-8b"


def test_a_model_that_does_not_fit_is_one_line_not_a_traceback(model, monkeypatch, capsys):
    import distrib
    import tensor_parallel_decode as script

    message = "--model llama-70b does not fit: even one layer per pipeline stage needs 99.0 GiB on GPU 0"

    def launch(*args, **kwargs):
        raise distrib.WorkerFailedError([distrib.errors.WorkerFailure(
            rank=0, timestamp=0.0, exc_type="tensor_parallel.fit.DoesNotFit", message=message,
            traceback="Traceback (most recent call last): ...")])

    monkeypatch.setattr(script.distrib, "launch", launch)
    assert script.main(["--device", "cpu", "--commit", "test"]) == 2
    err = capsys.readouterr().err
    assert f"[tp-decode] {message}\n" in err and "Traceback" not in err
