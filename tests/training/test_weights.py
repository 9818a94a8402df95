"""Starting weights: ImageNet by default when torchvision can fetch them, from scratch with one
clear line when it cannot, an error when they were asked for by name, and a local state dict.

The download is the one thing faked (it is the internet): ``load_state_dict_from_url`` either
fails as it does offline, or hands back a local state-dict file standing in for the download.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from shapcore.model import WeightsUnavailable, build_model
from training.cli import main
from training.presets import PROFILES

STAND_IN_SEED = 1234


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-50 state dict (1000-class head, seeded random values): the
    file the ImageNet download would have written."""
    torch.manual_seed(STAND_IN_SEED)
    path = tmp_path_factory.mktemp("weights") / "resnet50-stand-in.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def fake_download(monkeypatch: pytest.MonkeyPatch, *, serve: Path | None) -> list[str]:
    """Replace torchvision's download: serve ``serve`` or fail as with no network. Returns the
    URLs asked for."""
    asked: list[str] = []

    def download(url: str, *args, **kwargs):
        asked.append(url)
        if serve is None:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return torch.load(serve, weights_only=True)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", download)
    return asked


def train_cpu(registry: Path, data: Path, *extra: str) -> int:
    """The cpu profile (whose default weights are ImageNet's), one short epoch."""
    return main(["--quiet", "--registry", str(registry), "train", "--data", str(data), "--profile", "cpu",
                 "--epochs", "1", *extra])  # fmt: skip


def metadata(registry: Path) -> dict:
    (version,) = [p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return json.loads((version / "metadata.json").read_text())


def test_default_weights_fall_back_to_scratch_with_one_line_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], small_archive: Path, tmp_path: Path
) -> None:
    asked = fake_download(monkeypatch, serve=None)
    assert train_cpu(tmp_path / "reg", small_archive) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "ImageNet weights" in line]
    assert len(lines) == 1 and "training from scratch" in lines[0] and "--weights none" in lines[0], out
    assert asked and asked[0].endswith(".pth")
    meta = metadata(tmp_path / "reg")
    assert meta["weights"]["requested"] == "imagenet" and meta["weights"]["used"] == "none"
    assert "could not fetch" in meta["weights"]["note"]
    assert meta["hyperparameters"]["lr"] == PROFILES["cpu"].lr  # the from-scratch peak, not the fine-tuning one


def test_imagenet_weights_named_explicitly_are_an_error_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], small_archive: Path, tmp_path: Path
) -> None:
    fake_download(monkeypatch, serve=None)
    assert train_cpu(tmp_path / "reg", small_archive, "--weights", "imagenet") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ImageNet weights" in errors[0], err
    assert "--weights none" in errors[0] and "--weights PATH" in errors[0], err
    assert not (tmp_path / "reg").exists() or not any(p for p in (tmp_path / "reg").iterdir() if p.is_dir()
                                                      and not p.name.startswith("."))  # fmt: skip


def test_fetched_imagenet_weights_start_the_run_at_the_fine_tuning_lr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], small_archive: Path, tmp_path: Path,
    stand_in: Path,
) -> None:  # fmt: skip
    asked = fake_download(monkeypatch, serve=stand_in)
    assert train_cpu(tmp_path / "reg", small_archive) == 0
    assert "training from scratch" not in capsys.readouterr().out
    assert len(asked) == 1
    meta = metadata(tmp_path / "reg")
    assert meta["weights"] == {"requested": "imagenet", "used": "imagenet", "note": None}
    assert meta["hyperparameters"]["lr"] == PROFILES["cpu"].pretrained_lr != PROFILES["cpu"].lr


def test_the_run_starts_from_the_fetched_backbone_and_a_new_head(
    monkeypatch: pytest.MonkeyPatch, stand_in: Path
) -> None:
    """Every backbone tensor comes from the weights; the 10-class head is new."""
    from training.setup import _build_model, _choose_weights

    fake_download(monkeypatch, serve=stand_in)
    reference = torch.load(stand_in, weights_only=True)
    chosen = _choose_weights(PROFILES["cpu"], fallback=False, say=False)
    from training.distributed import Dist

    model, _ = _build_model(PROFILES["cpu"], 10, Dist(), torch.device("cpu"), chosen["state"])
    state = model.net.state_dict()
    backbone = [k for k in reference if not k.startswith("fc.")]
    assert all(torch.equal(state[k], reference[k]) for k in backbone)
    assert state["fc.1.weight"].shape == (10, 2048)
    # and not by accident: a random init differs from the stand-in
    fresh = build_model(10, zero_init_residual=True).state_dict()
    assert not torch.equal(fresh["conv1.weight"], reference["conv1.weight"])


def test_local_weights_file_and_none_never_download(
    monkeypatch: pytest.MonkeyPatch, small_archive: Path, tmp_path: Path, stand_in: Path
) -> None:
    asked = fake_download(monkeypatch, serve=None)
    assert train_cpu(tmp_path / "a", small_archive, "--weights", str(stand_in)) == 0
    assert metadata(tmp_path / "a")["weights"]["used"] == str(stand_in)
    assert train_cpu(tmp_path / "b", small_archive, "--weights", "none") == 0
    meta = metadata(tmp_path / "b")
    assert meta["weights"]["used"] == "none" and meta["hyperparameters"]["lr"] == PROFILES["cpu"].lr
    assert asked == []


def test_fetch_failure_is_a_user_error_naming_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_download(monkeypatch, serve=None)
    with pytest.raises(WeightsUnavailable, match=r"download\.pytorch\.org.*Name or service not known"):
        build_model(10, weights="imagenet")
