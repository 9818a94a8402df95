"""The runtime gate (shapcore/gate.py over the candidates of shapcore/runtimes.py): a candidate
that disagrees with fp32 is refused however fast, the fastest agreeing one is kept only when it
is fast enough, a named runtime that cannot run is a clear error, the exports are cached once per
version and rebuilt when their record does not match, and the service and the worker report
the runtime that runs.

The candidates' speed is the one thing injected (``gate.time_forms``, the gate's clock: what a
loaded machine would otherwise decide); their agreement is really measured, on real forms.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from shapcore import exports, gate
from shapcore.errors import UserError
from shapcore.exports import ONNX_FP32, cache_dirs
from shapcore.gate import MIN_AGREEMENT, Candidate, Unavailable, choose, top1_agreement
from shapcore.precision import BF16Autocast
from shapcore.registry import Registry
from shapcore.runtimes import ExportSource, OnnxRuntimeForm, as_unit_float
from shapcore.store import sha256_file


class NearTie(nn.Module):
    """Two classes whose logits sit around 100 and differ by ~1e-5 with the image's brightness:
    fp32 tells them apart, bf16 (steps of 0.5 at 100) rounds both to 100 and always says 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(1).mean(1, keepdim=True) / 255.0 - 0.5
        return nn.functional.linear(x, torch.tensor([[0.002], [-0.002]]), torch.tensor([100.0, 100.0]))


class Clear(nn.Module):
    """Margins far above bf16's rounding: both forms agree on every image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(1).mean(1, keepdim=True) / 255.0
        return nn.functional.linear(x, torch.tensor([[50.0], [-50.0]])) + torch.tensor([0.0, 25.0])


class FlipsSome(nn.Module):
    """``inner`` with its two classes swapped on every ``every``-th image: a stand-in runtime that
    disagrees with the baseline on 1/``every`` of the sample (an int8 model whose ranges were
    calibrated badly, say)."""

    def __init__(self, inner: nn.Module, every: int) -> None:
        super().__init__()
        self.inner, self.every = inner, every

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images).clone()
        idx = torch.arange(len(images))
        flip = (images.flatten(1)[:, 0].long() + idx) % self.every == 0
        out[flip] = out[flip].flip(1)
        return out


def sample_images(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def clock(seconds: dict[str, float]) -> Callable[..., dict[str, float]]:
    """A stand-in for :func:`gate.time_forms` reporting these seconds per call for each form
    (the names it is asked to time must all be known: a refused candidate is never timed)."""

    def time_forms(forms: dict, batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
        assert set(forms) <= set(seconds), forms
        return {name: seconds[name] for name in forms}

    return time_forms


def unavailable() -> nn.Module:
    raise Unavailable("stand-in library not installed")


def test_near_ties_flip_in_bf16() -> None:
    """The stand-ins do what the gate must catch (else the next tests prove nothing)."""
    model, images = NearTie(), sample_images()
    fp32 = model(images).argmax(1)
    assert 0.2 < fp32.float().mean() < 0.8, "fp32 must pick both classes"
    assert top1_agreement(model, BF16Autocast(model, "cpu"), images) < 0.9
    assert top1_agreement(Clear(), BF16Autocast(Clear(), "cpu"), images) == 1.0
    assert 0.95 < top1_agreement(Clear(), FlipsSome(Clear(), 50), images) < MIN_AGREEMENT


def test_gate_refuses_a_disagreeing_candidate_however_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five stand-ins: one flips 2 % of the answers and is the fastest (refused, never timed), one
    agrees and is 1.6x (chosen), one agrees but is 1.05x (too slow to be worth it), one is
    unavailable, one breaks. The report says each one's fate."""
    clear = Clear()
    monkeypatch.setattr(gate, "time_forms", clock({"torchscript": 1.0, "flips": 0.1, "fast": 1 / 1.6,
                                                   "meh": 1 / 1.05}))  # fmt: skip

    def broken() -> nn.Module:
        raise RuntimeError("the runtime rejects this graph")

    cands = [Candidate("flips", "int8", lambda: FlipsSome(clear, 50)), Candidate("fast", "fp32", lambda: clear),
             Candidate("meh", "fp32", lambda: clear), Candidate("missing", "fp32", unavailable),
             Candidate("broken", "fp32", broken)]  # fmt: skip
    choice, form = choose("auto", ("torchscript", clear), cands, sample_images(), (1, 8))
    assert choice.chosen == "fast" and form is clear
    assert choice.speedup == pytest.approx(1.6) and choice.agreement == 1.0 and choice.timed_batches == (1, 8)
    fates = {c.name: c for c in choice.candidates}
    assert fates["flips"].status == "refused" and fates["flips"].agreement < MIN_AGREEMENT
    assert "below 99.5 %" in fates["flips"].reason and not fates["flips"].ms
    assert fates["meh"].status == "slow" and fates["missing"].status == "unavailable"
    assert "not installed" in fates["missing"].reason and fates["broken"].status == "failed"
    assert fates["torchscript"].status == "baseline" and set(fates["fast"].ms) == {1, 8}

    # the disagreeing one alone: refused however fast, and the baseline runs
    choice, form = choose("auto", ("torchscript", clear), cands[:1], sample_images(), (8,))
    assert choice.chosen == "torchscript" and form is clear and choice.speedup == 1.0


def test_real_bf16_near_ties_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 is a candidate like the others: on the near-tie model its real top-1 flips, and it is refused."""
    model = NearTie()
    monkeypatch.setattr(gate, "time_forms", clock({"torchscript": 2.0, "bf16": 1.0}))
    cands = [Candidate("bf16", "bf16", lambda: BF16Autocast(model, "cpu"))]
    choice, form = choose("auto", ("torchscript", model), cands, sample_images(), (32,))
    assert choice.chosen == "torchscript" and form is model and choice.candidates[1].status == "refused"
    clear = Clear()
    cands = [Candidate("bf16", "bf16", lambda: BF16Autocast(clear, "cpu"))]
    choice, form = choose("auto", ("torchscript", clear), cands, sample_images(), (32,))
    assert choice.chosen == "bf16" and choice.precision == "bf16" and isinstance(form, BF16Autocast)


def test_named_runtimes_are_not_measured_and_an_unavailable_one_is_an_error() -> None:
    clear, built = Clear(), []

    def build() -> nn.Module:
        built.append(1)
        return clear

    cands = [Candidate("fast", "fp32", build), Candidate("missing", "fp32", unavailable)]
    choice, form = choose("torchscript", ("torchscript", clear), cands, sample_images(), (8,))
    assert (choice.chosen, choice.speedup, built) == ("torchscript", None, [])
    choice, form = choose("fast", ("torchscript", clear), cands, sample_images(), (8,))
    assert form is clear and choice.chosen == "fast" and "not measured" in choice.reason and built == [1]
    with pytest.raises(UserError, match=r"RUNTIME=missing is unavailable here: stand-in library not installed"):
        choose("missing", ("torchscript", clear), cands, sample_images(), (8,))
    with pytest.raises(UserError, match="not a runtime"):
        choose("tensorrt", ("torchscript", clear), cands, sample_images(), (8,))
    choice, _ = choose("auto", ("torchscript", clear), cands, torch.empty(0), (8,))
    assert choice.chosen == "torchscript" and "no validation sample" in choice.reason


def test_time_forms_keeps_each_forms_best_call() -> None:
    """The timing itself, on forms whose cost is known: each call of a form advances a fake clock
    by its cost (the slowest call first); the best call of each is what is reported."""
    now = [0.0]
    costs = {"fp32": [9.0, 3.0], "bf16": [8.0, 1.5]}  # a slow first timed call, then steady

    def form(name: str):
        calls = []

        def run(batch: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            timed_calls = len(calls) - 3  # three untimed calls first
            now[0] += costs[name][0] if timed_calls <= 1 else costs[name][1]
            return batch

        return run

    forms = {"fp32": form("fp32"), "bf16": form("bf16")}
    patch = pytest.MonkeyPatch()
    patch.setattr(gate.time, "perf_counter", lambda: now[0])
    try:
        best = gate.time_forms(forms, torch.zeros(1), rounds=4)
    finally:
        patch.undo()
    assert best == {"fp32": 3.0, "bf16": 1.5}


def test_a_cached_export_is_reused_and_rebuilt_when_its_hash_does_not_match(
    smoke_model: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ONNX export of the smoke model: built once into the version's folder, reused by the
    next load (same file, not rewritten), rebuilt when the file no longer matches its recorded
    sha256 (the log says so), and built into the local cache when the version's folder is read-only."""
    registry, version = smoke_model
    copy = tmp_path / "registry" / version
    shutil.copytree(registry / version, copy)
    loaded = Registry(copy.parent).load(version)

    def source() -> ExportSource:
        return ExportSource(loaded.model, copy, lambda: as_unit_float(loaded.validation_sample()), tmp_path / "cache")

    first = source().onnx_fp32()
    assert first == copy / "runtimes" / ONNX_FP32 and first.with_name(ONNX_FP32 + ".json").is_file()
    stamp = first.stat().st_mtime_ns
    assert source().onnx_fp32() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    images = loaded.background()[:4]
    with torch.no_grad():
        want = loaded.model(images)
    assert torch.allclose(OnnxRuntimeForm(first)(images), want, atol=1e-3)

    with first.open("r+b") as fh:  # one byte altered: the file no longer matches its record
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    caplog.set_level(logging.INFO, logger="shapcore.exports")
    again = source().onnx_fp32()
    assert again == first and "rebuilding model-fp32.onnx" in caplog.text and "sha256 does not match" in caplog.text
    record = __import__("json").loads(first.with_name(ONNX_FP32 + ".json").read_text())
    assert sha256_file(again) == record["sha256"] and record["inputs"]["weights_sha256"] == sha256_file(
        copy / "model.safetensors")

    # A read-only registry (the OS's answer faked: the tests may run as root, who writes anywhere):
    # the local cache takes the export.
    shutil.rmtree(copy / "runtimes")
    writable = exports._writable
    monkeypatch.setattr(exports, "_writable", lambda folder: not folder.is_relative_to(copy) and writable(folder))
    local = source().onnx_fp32()
    assert not (copy / "runtimes").exists()
    assert local == cache_dirs(copy, tmp_path / "cache")[1] / ONNX_FP32 and local.is_file()


def test_versions_store_a_validation_sample(smoke_model: tuple[Path, str], small_archive: Path) -> None:
    """Held-out images recorded at training time, beside the background: what the gate reads."""
    from shapcore.registry import Registry
    from training.data import load_images, split_train_val

    registry, version = smoke_model
    loaded = Registry(registry).load(version)
    sample, background = loaded.validation_sample(), loaded.background()
    meta, hp = loaded.metadata, loaded.metadata["hyperparameters"]
    held_out = min(500, meta["data"]["val_size"])
    assert sample.dtype == torch.uint8 and len(sample) == len(background) + held_out
    # the recorded images are the run's first validation images, none it trained on
    data = load_images(str(small_archive), split=["train"], progress=False)
    _, val_idx = split_train_val(len(data), hp["val_fraction"], hp["seed"])
    assert torch.equal(sample[len(background) :], data.images[val_idx[:held_out]])


def test_service_and_worker_report_their_choice(start_service, smoke_model: tuple[Path, str]) -> None:
    """``auto`` on a service of its own (the suite's services pin torchscript), at two batch sizes:
    /model names the runtime it chose with its speed-up and agreement and every candidate's fate.
    Which one wins depends on this machine's load; that a choice is made and reported does not."""
    # two fp32 candidates (the int8 export's calibration would take minutes on a busy machine)
    env = {"RUNTIME": "auto", "BATCH_MAX_SIZE": "4", "RUNTIME_CANDIDATES": "onnxruntime,openvino"}
    service = start_service(env=env, wait=None)
    service.wait("ready", timeout=600)
    try:
        body = service.client.get("/model").json()
    finally:
        service.stop()
    gate_report = body["runtime_choice"]
    assert gate_report["requested"] == "auto" and gate_report["reason"] and gate_report["timed_batches"] == [1, 4]
    assert gate_report["speedup"] >= (1.0 if gate_report["chosen"] == "torchscript" else 1.1)
    assert gate_report["agreement"] >= MIN_AGREEMENT
    names = {c["name"]: c for c in gate_report["candidates"]}
    assert {"torchscript", "onnxruntime", "openvino", "int8", "compile"} <= set(names)
    assert names["int8"]["status"] == "skipped" and names["int8"]["reason"] == "not in RUNTIME_CANDIDATES"
    assert names[gate_report["chosen"]]["status"] in ("chosen", "baseline")
    if importlib.util.find_spec("onnxruntime") is not None:  # the `runtimes` extra: measured
        assert names["onnxruntime"]["agreement"] is not None, names["onnxruntime"]
    else:
        assert names["onnxruntime"]["status"] == "unavailable" and "not installed" in names["onnxruntime"]["reason"]
    assert body["runtime"].startswith(gate_report["chosen"]) or gate_report["chosen"] == "torchscript"

    from shapcore.jobs.settings import ExplainSettings
    from worker.runtime import Runtime

    registry, version = smoke_model
    rt = Runtime(ExplainSettings(model_registry=registry, explain_runtime="torchscript")).load(version)
    assert rt.runtime.chosen == "torchscript" and "not measured" in rt.runtime.reason


def test_a_forking_worker_never_measures_or_runs_openvino(smoke_model: tuple[Path, str]) -> None:
    """OpenVINO's threads do not survive ``fork()``: a work horse forked after the parent ran it
    aborted (``std::system_error: No such process``, every job failed). A forking worker skips
    its candidates, saying why; naming one is a clear error; a worker that does not fork measures them."""
    from shapcore.jobs.settings import ExplainSettings
    from worker.runtime import Runtime

    registry, version = smoke_model
    common = {"model_registry": registry, "runtime_candidates": "openvino,openvino-int8"}
    forking = Runtime(ExplainSettings(**common, explain_runtime="auto", explain_fork=True), device="cpu")
    rt = forking.load(version)
    fates = {c["name"]: c for c in rt.runtime.as_dict()["candidates"]}
    for name in ("openvino", "openvino-int8"):
        assert fates[name]["status"] == "skipped" and "fork()" in fates[name]["reason"], fates[name]
    assert rt.runtime.chosen == "torchscript"
    with pytest.raises(UserError, match="EXPLAIN_FORK=false"):
        Runtime(ExplainSettings(**common, explain_runtime="openvino", explain_fork=True), device="cpu").load(version)
    if importlib.util.find_spec("openvino") is not None:  # the `runtimes` extra: measured when nothing forks
        plain = Runtime(ExplainSettings(**common, explain_runtime="auto", explain_fork=False), device="cpu")
        fates = {c["name"]: c for c in plain.load(version).runtime.as_dict()["candidates"]}
        assert fates["openvino"]["status"] != "skipped", fates["openvino"]
