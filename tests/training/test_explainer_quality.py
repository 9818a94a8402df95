"""The amortised explainer's quality figures (issue 26): the scoring against KernelSHAP tells a
faithful explainer from a weak one, and ``fit-explainer`` stores the figures with the explainer
(the fitting marker gone once it ends); ``score-explainer`` scores an explainer fitted without them.

The known game: a model whose probabilities are affine in the image's channel means, so that with
the ``mean`` fill every coalition's value is additive over the grid's cells and each cell's exact
Shapley value is its own share (KernelSHAP's regression recovers an additive game exactly).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from shapcore.background import summarize_background
from shapcore.explainer_status import FITTING_FILE, read_fitting, refusal
from shapcore.fastshap import EXPLAINER_FILE, ExplainerNet, read_meta, save_explainer
from shapcore.players import grid_weights
from training import explainer_quality as quality
from training.data import load_images

CLASSES = 10


class Affine(nn.Module):
    """Float images -> log-probabilities affine in the channel means (rows of ``w`` sum to zero)."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(CLASSES, 3, generator=torch.Generator().manual_seed(0))
        w = w - w.mean(dim=0, keepdim=True)
        self.register_buffer("w", 0.15 * w / w.abs().sum(dim=1).max())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (1.0 / CLASSES + (images.float().mean(dim=(2, 3)) - 0.5) @ self.w.T).log()

    def exact(self, images: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        diff = (images - fill).reshape(len(images), 3, -1)
        per_cell = torch.einsum("mp,ncp->nmc", torch.from_numpy(grid_weights()), diff) / diff.shape[-1]
        return per_cell @ self.w.T  # (N, 64, C)


@pytest.fixture(scope="module")
def images(small_archive: Path) -> torch.Tensor:
    return load_images(str(small_archive), split="train", progress=False).images


def test_the_scoring_tells_a_faithful_explainer_from_a_weak_one(images: torch.Tensor) -> None:
    model, fill = Affine(), summarize_background(images[:100], 1)
    cfg = quality.QualityConfig(images=4, samples=256)

    def exact(x: torch.Tensor, grand: torch.Tensor) -> torch.Tensor:
        return model.exact(x, fill.images[0])

    def weak(x: torch.Tensor, grand: torch.Tensor) -> torch.Tensor:  # values that know nothing of the image
        return torch.randn(len(x), 64, CLASSES, generator=torch.Generator().manual_seed(1)) * 1e-3

    good, bad = quality.score(model, fill, exact, images, cfg), quality.score(model, fill, weak, images, cfg)
    assert good["images"] == 4 and good["reference"]["samples"] == 256 and good["kernel"]["samples"] == 256
    assert good["median_rho"] > 0.99 and good["median_relative_l2"] < 1e-3, good  # an additive game: exact
    assert good["kernel"]["median_rho"] > 0.99  # KernelSHAP is exact on it too, at any seed
    assert bad["median_rho"] < 0.5 and bad["median_relative_l2"] > 0.5, bad
    assert good["deletion_auc"] < bad["deletion_auc"] and good["insertion_auc"] > bad["insertion_auc"]
    assert good["beats_random"] == 1.0 and good["model_evaluations"] > 4 * 2 * 256
    # the service's verdict on each (shapcore.explainer_status)
    meta = {"model_version": "v", "data": {"source": "d.tar.gz"}}
    assert refusal({**meta, "quality": good}, 0.8) is None
    code, message, details = refusal({**meta, "quality": bad}, 0.8)
    assert code == "explainer_below_floor" and f"median Spearman rho {bad['median_rho']:.3f}" in message
    assert details[0]["value"] == bad["median_rho"] and "fit-explainer --version v --data d.tar.gz" in message
    assert refusal(meta, 0.8)[0] == "explainer_unscored"


def test_fit_explainer_stores_its_figures_and_score_explainer_rescores(
    smoke_model, small_archive, tmp_path, monkeypatch
) -> None:
    import shutil

    from shapcore.registry import Registry
    from training import fastshap
    from training.cli import main

    registry = tmp_path / "registry"
    shutil.copytree(smoke_model[0], registry)
    folder = registry / smoke_model[1]
    seen: list[dict | None] = []

    def fit(game, train, held_out, classes, cfg, progress=True, **network):
        """The fit itself is tests/shapcore/test_fastshap.py's: here an untrained network stands in
        (a real fit's budget check fails on a loaded 2-core machine), and the marker is looked at."""
        seen.append(read_fitting(folder))
        return ExplainerNet(classes, width=cfg.width), game.null(), {"fit_seconds": 0.0}

    monkeypatch.setattr(fastshap, "fit", fit)
    fit_cfg = fastshap.FitConfig(minutes=0.3, width=8)
    qcfg = quality.QualityConfig(images=2, samples=128)
    quality.fit_scored(Registry(registry), None, str(small_archive), fit_cfg, qcfg, progress=False)
    assert seen[0] is not None and seen[0]["phase"] == "fitting" and seen[0]["minutes_left"] >= 1
    meta = read_meta(folder / EXPLAINER_FILE)
    q = meta["quality"]
    assert q["images"] == 2 and q["reference"] == {
        "estimator": "KernelSHAP", "samples": 128, "runs": 2, "seeds": [1, 2],
        "implementation": "shapcore.shapley method=leverage"}
    for figures in (q, q["kernel"]):
        assert -1.0 <= figures["median_rho"] <= 1.0 and 0.0 <= figures["deletion_auc"] <= 1.0
    assert not (folder / FITTING_FILE).exists(), "the fitting marker outlived the fit"

    # an explainer from before the figures: score-explainer adds them, weights untouched
    old = {k: v for k, v in meta.items() if k != "quality"}
    net = ExplainerNet(CLASSES, width=8)
    save_explainer(folder, net, torch.full((CLASSES,), 0.1), old)
    assert "quality" not in read_meta(folder / EXPLAINER_FILE)
    code = main(["--quiet", "--registry", str(registry), "score-explainer", "--data", str(small_archive),
                 "--quality-images", "2", "--quality-samples", "64"])  # fmt: skip
    assert code == 0
    rescored = read_meta(folder / EXPLAINER_FILE)
    assert rescored["quality"]["images"] == 2 and rescored["quality"]["reference"]["samples"] == 64
    assert json.dumps(rescored["network"]) == json.dumps(net.config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_fit_explainer_on_a_missing_gpu_says_so_in_one_line(smoke_model, small_archive, capsys) -> None:
    """``--device cuda`` where torch sees none: exit 2 and one line naming the option, before any work."""
    from training.cli import main

    code = main(["--quiet", "--registry", str(smoke_model[0]), "fit-explainer", "--data", str(small_archive),
                 "--device", "cuda", "--time-budget", "0.5"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device=cuda" in err[0] and "no CUDA device" in err[0], err
