"""fp32 or bf16 by measurement (shapcore/precision.py): the agreement gate, the decision, and
what the service and the worker report.

Whether the CPU has native bf16 is the one thing faked (``native_bf16``: a fact of the
hardware, outside the code under test): with it on, the gate really runs both forms of a model
and really measures their top-1 agreement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shapcore import precision
from shapcore.precision import MIN_AGREEMENT, BF16Autocast, choose_precision, decide, top1_agreement


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


def sample_images(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def test_near_ties_flip_in_bf16() -> None:
    """The stand-in does what the gate must catch (else the next test proves nothing)."""
    model, images = NearTie(), sample_images()
    fp32 = model(images).argmax(1)
    assert 0.2 < fp32.float().mean() < 0.8, "fp32 must pick both classes"
    agreement = top1_agreement(model, BF16Autocast(model, "cpu"), images)
    assert agreement < 0.9
    assert top1_agreement(Clear(), BF16Autocast(Clear(), "cpu"), images) == 1.0


def test_gate_refuses_bf16_when_it_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    model = NearTie()
    choice, form = choose_precision("auto", "cpu", model, lambda: BF16Autocast(model, "cpu"), sample_images(), 32)
    assert choice.chosen == "fp32" and form is model
    assert choice.agreement is not None and choice.agreement < MIN_AGREEMENT
    assert "agrees with fp32 on" in choice.reason and choice.sample_images == 200
    assert choice.fp32_ms is not None and choice.bf16_ms is not None and choice.timed_batch == 32

    # refused however fast bf16 is here: the clock is not what decided
    monkeypatch.setattr(precision, "time_forms", timed(fp32_s=2.0, bf16_s=1.0))
    choice, form = choose_precision("auto", "cpu", model, lambda: BF16Autocast(model, "cpu"), sample_images(), 32)
    assert choice.chosen == "fp32" and form is model and "agrees with fp32 on" in choice.reason


def timed(fp32_s: float, bf16_s: float):
    """A stand-in for :func:`precision.time_forms` that reports these seconds per call (the gate's
    clock, injected: what the host's bf16 speed would otherwise decide), after checking that it
    is asked to time both forms on the batch the gate built."""

    def time_forms(forms: dict, batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
        assert set(forms) == {"fp32", "bf16"} and batch.dtype == torch.uint8
        return {"fp32": fp32_s, "bf16": bf16_s}

    return time_forms


@pytest.mark.parametrize(("fp32_s", "bf16_s", "chosen"), [(2.0, 1.0, "bf16"), (1.0, 1.0, "fp32"), (1.0, 2.0, "fp32")])
def test_agreeing_bf16_is_chosen_only_when_the_clock_says_faster(
    monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float, chosen: str
) -> None:
    """Both branches of the gate on every host: a model bf16 cannot flip (agreement 100 %), the
    timing injected. Faster: bf16, and the form served is the bf16 one; not faster: fp32 and its form."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "time_forms", timed(fp32_s, bf16_s))
    clear = Clear()
    choice, form = choose_precision("auto", "cpu", clear, lambda: BF16Autocast(clear, "cpu"), sample_images(), 32)
    assert choice.agreement == 1.0 and choice.chosen == chosen
    assert (choice.fp32_ms, choice.bf16_ms, choice.timed_batch) == (1000 * fp32_s, 1000 * bf16_s, 32)
    if chosen == "bf16":
        assert isinstance(form, BF16Autocast) and form.inner is clear and "faster" in choice.reason
    else:
        assert form is clear and "not faster" in choice.reason


def test_time_forms_keeps_each_forms_best_call() -> None:
    """The timing itself, on forms whose cost is known: each call of a form advances a fake clock
    by its cost (the slowest call first); the best call of each is what is reported."""
    now = [0.0]
    costs = {"fp32": [9.0, 3.0], "bf16": [8.0, 1.5]}  # a slow first timed call, then steady

    def form(name: str):
        calls = []

        def run(batch: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            timed_calls = len(calls) - 2  # two untimed calls first
            now[0] += costs[name][0] if timed_calls <= 1 else costs[name][1]
            return batch

        return run

    forms = {"fp32": form("fp32"), "bf16": form("bf16")}
    clock = pytest.MonkeyPatch()
    clock.setattr(precision.time, "perf_counter", lambda: now[0])
    try:
        best = precision.time_forms(forms, torch.zeros(1), rounds=4)
    finally:
        clock.undo()
    assert best == {"fp32": 3.0, "bf16": 1.5}


def test_decision_needs_both_speed_and_agreement() -> None:
    assert decide(2.0, 1.0, 1.0)[0] == "bf16"
    assert decide(2.0, 1.0, 0.99)[0] == "fp32"  # twice as fast, but 1 % of predictions change
    assert decide(2.0, 1.0, MIN_AGREEMENT)[0] == "bf16"
    assert decide(1.0, 1.0, 1.0)[0] == "fp32"  # as right, not faster
    assert decide(1.0, 2.0, 1.0)[0] == "fp32"


def test_asked_precisions_and_no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    model, built = Clear(), []

    def bf16() -> nn.Module:
        built.append(1)
        return BF16Autocast(model, "cpu")

    choice, form = choose_precision("fp32", "cpu", model, bf16, sample_images(), 8)
    assert (choice.chosen, form, built) == ("fp32", model, [])
    choice, form = choose_precision("bf16", "cpu", model, bf16, sample_images(), 8)
    assert choice.chosen == "bf16" and isinstance(form, BF16Autocast) and choice.agreement is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    built.clear()
    choice, form = choose_precision("auto", "cpu", model, bf16, sample_images(), 8)
    assert choice.chosen == "fp32" and "no native bf16" in choice.reason and built == []


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
    service = start_service(env={"PRECISION": "auto"})  # the suite's services pin fp32
    try:
        body = service.client.get("/model").json()
    finally:
        service.stop()
    p = body["precision"]
    assert p["requested"] == "auto" and p["chosen"] in ("fp32", "bf16") and p["reason"]
    assert ("+bf16" in body["runtime"]) == (p["chosen"] == "bf16")

    from shapcore.jobs.settings import ExplainSettings
    from worker.runtime import Runtime

    registry, version = smoke_model
    rt = Runtime(ExplainSettings(model_registry=registry, explain_precision="fp32")).load(version)
    assert rt.precision is not None and rt.precision.chosen == "fp32" and "fp32" in rt.precision.reason
