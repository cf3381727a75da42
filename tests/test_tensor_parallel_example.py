"""The tensor-parallel decode example (examples/tensor_parallel_decode.py) on CPU ranks, so it cannot rot.

- the split is right: a TP=2 model computes what the TP=1 model computes
  (ranks as threads here, summing through a shared list);
- a smoke run on 2 CPU ranks (gloo, tiny model) checks the communicators
  against each other, times them, and writes its record;
- the check can fail: a communicator whose all-reduce is a no-op stops the run.
"""
from __future__ import annotations

import json
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


def _logits(model, shape, tp: int, batch: int):
    import torch

    ranks, outputs, errors = _ThreadRanks(tp), [None] * tp, []

    def run(rank: int) -> None:
        try:
            weights = model.DecoderWeights(shape, tp, rank, batch, torch.device("cpu"), seed=3)
            decoder = model.TensorParallelDecoder(weights)
            x = model.decode_inputs(shape, batch, torch.device("cpu"), seed=3)
            outputs[rank] = decoder.step(x, ranks.all_reduce(rank))
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test's thread
            errors.append(exc)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return torch.cat(outputs, dim=-1).float()  # vocabulary shards in rank order


def test_a_tensor_parallel_split_computes_what_one_rank_computes(model):
    shape = model.SHAPES["tiny"]
    whole = _logits(model, shape, 1, batch=3)
    split = _logits(model, shape, 2, batch=3)
    assert whole.shape == split.shape == (3, shape.vocab)
    # Only the rounding of the partial sums differs (bf16): ~1% of the logits' norm.
    assert ((split - whole).norm() / whole.norm()).item() < 0.03
    # ... and a wrong split would not pass: another seed's weights are far off.
    assert ((_logits_other_seed(model, shape) - whole).norm() / whole.norm()).item() > 0.5


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


def test_shared_gpus_are_for_gpus():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--devices", "0,0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--devices names GPUs" in result.stderr
