"""The tensor-parallel decode example (examples/tensor_parallel_decode.py) on CPU ranks, so it cannot rot.

- the split is right: a TP=2 model, and TP=2 x PP=2 and TP=1 x PP=3
  pipelines, compute what the TP=1 model computes (ranks as threads here,
  summing through a shared list, passing hidden states through queues);
- a smoke run on 2 CPU ranks (gloo, tiny model) checks the communicators
  against each other, times them, and writes its record; so does one on 4
  ranks as TP=2 x PP=2, checked against the unsplit model;
- the check can fail: a communicator whose all-reduce is a no-op stops the
  run, and so does a pipeline stage that sends zeros.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
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


def _run_example(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--nprocs", "2", "--model", "tiny",
         "--batch-sizes", "1,4", "--steps", "3", "--warmup", "1", "--out", str(tmp_path),
         "--commit", "test-commit", *extra],
        capture_output=True, text=True, timeout=180)


def test_cpu_smoke_run_checks_times_and_writes_its_record(tmp_path):
    result = _run_example(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
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
        assert "no plot" in result.stderr
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
