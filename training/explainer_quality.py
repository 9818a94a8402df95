"""How good a fitted amortised explainer is: scored against KernelSHAP on held-out images (issue 26).

``fit-explainer`` ends here, before the explainer file is written, so that the figures travel in
its metadata (``quality``): ``/model`` shows them, every ``method=fast`` answer carries them, and
below ``EXPLAIN_FAST_MIN_RHO`` the service refuses to serve it (:mod:`shapcore.explainer_status`).

On each of ``images`` held-out images (the last ones of the held-out part: the fit's own
validation set is its first ones), over the 8×8 grid's players with the ``mean`` fill (the value
function the explainer was fitted against), for the predicted class:

- **reference**: KernelSHAP's regression (:func:`shapcore.shapley.estimate_shapley`) sampled by
  leverage scores (``method="leverage"``, Leverage SHAP: 11-23 % lower error than shap's KernelSHAP
  at equal evaluations in BENCHMARKS' estimator table), run twice with ``samples`` coalitions each
  (two seeds) and averaged;
- **fast**: the explainer's values; Spearman ρ and the relative L2 error
  ``‖φ − φ_ref‖ / ‖φ_ref‖`` against the reference, deletion and insertion AUCs
  (:mod:`shapcore.faithfulness`, 32 steps) and whether both curves beat random orders;
- **kernel**: the second run alone (``samples`` coalitions) against the first, with the same
  figures: a KernelSHAP job at that budget beside the explainer. Its ρ is the runs' seed-to-seed
  agreement: a modest reference caps what any explainer can score against it (on a weak 38 %
  model, one 2048-sample run agreed with another at median ρ 0.63: BENCHMARKS), and this row says
  where that cap is; the averaged reference is less noisy than either run.

Medians over the images. Cost: about ``images × (2·samples + 260)`` model evaluations (8 × 4,356 =
35k at the defaults, ~1.5 min at the cpu model's ~400 evaluations a second on two cores); the
explainer's own forward passes are free beside them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapcore.agreement import agreement
from shapcore.background import BackgroundSet
from shapcore.explainer_status import write_fitting
from shapcore.faithfulness import faithfulness
from shapcore.fastshap import efficient_normalize
from shapcore.players import GRID_CELLS, grid_weights
from shapcore.shapley.estimator import estimate_shapley
from shapcore.value import CoalitionModel
from training.explainer_game import Game

#: Model evaluations one image's deletion and insertion curves take beside KernelSHAP's (both rankings).
CURVE_EVALUATIONS = 260


@dataclass(frozen=True)
class QualityConfig:
    images: int = 8
    samples: int = 2048  # coalitions of each of the reference's two runs
    seed: int = 0
    method: str = "leverage"  # shapcore.shapley's sampler: leverage, kernel or kernel_strata

    def evaluations(self) -> int:
        return self.images * (2 * self.samples + CURVE_EVALUATIONS)


def _figures(rows: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the images, and the share that beat random orders on both curves."""
    med = {k: float(np.median([r[k] for r in rows])) for k in ("rho", "relative_l2", "deletion_auc", "insertion_auc")}
    wins = [r["deletion_auc"] < r["random_deletion_auc"] and r["insertion_auc"] > r["random_insertion_auc"]
            for r in rows]  # fmt: skip
    return {"median_rho": med["rho"], "median_relative_l2": med["relative_l2"], "deletion_auc": med["deletion_auc"],
            "insertion_auc": med["insertion_auc"], "beats_random": float(np.mean(wins))}  # fmt: skip


def _one(f: CoalitionModel, phi: np.ndarray, reference: np.ndarray, target: int) -> dict[str, float]:
    rho, l2 = agreement(phi[:, target], reference[:, target])
    faith = faithfulness(f, phi[:, target], target, seed=0)
    return {"rho": rho, "relative_l2": l2, **{k: faith[k] for k in
            ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")}}  # fmt: skip


def score(
    model: torch.nn.Module,
    fill: BackgroundSet,
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    cfg: QualityConfig,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Score ``explain`` (float images (N, 3, 32, 32) in [0, 1] and the model's probabilities on
    them -> values (N, 64, C), on the CPU) on the last ``cfg.images`` of ``images`` (uint8); the
    figures. ``model`` runs on ``device`` (the reference's and the curves' evaluations)."""
    started = time.perf_counter()
    device = torch.device(device)
    picked = images[-cfg.images :]
    x = picked.float() / 255.0
    m, A = GRID_CELLS * GRID_CELLS, grid_weights(GRID_CELLS)
    game = Game(model, fill, device=device)  # the value function the explainer was fitted against
    grand, null = game.grand(x).cpu(), game.null().cpu()
    with torch.no_grad():
        fast = explain(x, grand).double().numpy()
    rows: dict[str, list[dict[str, float]]] = {"fast": [], "kernel": []}
    evaluations = len(x) + 1
    for i in range(len(x)):
        fx = grand[i].double().numpy()
        f = CoalitionModel(model, picked[i], A, fill, fx=fx, device=device)
        runs = [estimate_shapley(f, m, cfg.samples, method=cfg.method, v_empty=null.double().numpy(), v_full=fx,
                                 seed=cfg.seed * 2 + k).values for k in (1, 2)]  # fmt: skip
        target = int(np.argmax(fx))
        rows["fast"].append(_one(f, fast[i], (runs[0] + runs[1]) / 2.0, target))
        rows["kernel"].append(_one(f, runs[1], runs[0], target))
        evaluations += f.evaluations
    fast_figures = _figures(rows["fast"])
    return {
        **fast_figures,
        "images": len(x),
        "image_source": "the last images of the held-out part",
        "players": "grid",
        "background": "mean",
        "target": "the predicted class",
        "reference": {"estimator": "KernelSHAP", "implementation": f"shapcore.shapley method={cfg.method}",
                      "samples": cfg.samples, "runs": 2, "seeds": [cfg.seed * 2 + 1, cfg.seed * 2 + 2]},
        "kernel": {"samples": cfg.samples, "against": "the reference's first run", **_figures(rows["kernel"])},
        "random": {"deletion_auc": float(np.median([r["random_deletion_auc"] for r in rows["fast"]])),
                   "insertion_auc": float(np.median([r["random_insertion_auc"] for r in rows["fast"]]))},
        "per_image": [{"rho": round(a["rho"], 4), "kernel_rho": round(b["rho"], 4)}
                      for a, b in zip(rows["fast"], rows["kernel"], strict=True)],
        "config": asdict(cfg),
        "model_evaluations": int(evaluations),
        "seconds": time.perf_counter() - started,
        "scored": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def net_explain(net: torch.nn.Module, null: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A fitted network as :func:`score` wants it: efficient values, eval mode, no gradients."""

    def explain(x: torch.Tensor, grand: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return efficient_normalize(net(x, grand.float()), grand.float(), null)

    return explain


def fit_hook(folder: Path, data: str, cfg: QualityConfig, started: float) -> Callable[..., dict[str, Any]]:
    """What ``training.fastshap.run`` calls once the fit ends (``score=``): update the fitting
    marker with the scoring's expected length (from the evaluations a second the fit reached),
    then score. ``started``: ``time.perf_counter()`` when the command began."""

    def hook(game: Any, net: torch.nn.Module, null: torch.Tensor, held_out: torch.Tensor) -> dict[str, Any]:
        rate = getattr(game, "evaluations", 0) / max(time.perf_counter() - started, 1.0)
        write_fitting(folder, seconds_left=cfg.evaluations() / max(rate, 50.0), phase="scoring", data=data)
        return score(game.model, game.fill, net_explain(net, null), held_out, cfg, device=game.device)

    return hook


def scoring_minutes(cfg: QualityConfig, evaluations_per_s: float = 300.0) -> float:
    """A first guess of the scoring's length (before the fit has measured the model's speed)."""
    return math.ceil(cfg.evaluations() / evaluations_per_s / 6.0) / 10.0


def held_out(loaded: Any, data: Any, seed: int = 0) -> torch.Tensor:
    """The held-out images ``fit-explainer`` scores on (as :func:`training.fastshap.run` splits):
    the version's own validation part when ``data`` is its training data, else 10 % of ``data``."""
    from training.data import split_train_val

    meta = loaded.metadata
    if data.sha256 == meta["data"]["sha256"] and data.split == meta["data"]["split"]:
        hp = meta["hyperparameters"]
        return data.images[split_train_val(len(data), hp["val_fraction"], hp["seed"])[1]]
    return data.images[split_train_val(len(data), 0.1, seed)[1]]


def rescore(
    registry: Any,
    version: str | None,
    data_src: str,
    cfg: QualityConfig,
    *,
    progress: bool = True,
    device: str = "auto",
) -> str:
    """``score-explainer``: score a version's stored explainer (one fitted before the figures
    existed, or to score it again with other settings) and rewrite its metadata; returns its path.
    ``device``: where the model's evaluations run (auto: CUDA when torch sees one)."""
    from shapcore.background import summarize_background
    from shapcore.errors import UserError
    from shapcore.fastshap import EXPLAINER_FILE, load_explainer, save_explainer
    from shapcore.inference import resolve_device
    from training.data import load_images
    from training.explainer_game import value_model

    registry.check_writable()
    on = resolve_device(device, setting="--device")
    loaded = registry.load(version)
    path = loaded.path / EXPLAINER_FILE
    if not path.is_file():
        raise UserError(f"{loaded.version} has no explainer to score: fit one with `python -m training fit-explainer`")
    fx = load_explainer(path, version=loaded.version, class_names=loaded.class_names)
    data = load_images(data_src, split=["train"], class_names=loaded.class_names, progress=progress)
    images = held_out(loaded, data)
    if len(images) == 0:
        raise UserError(f"{data_src} leaves no held-out images to score on")
    fill = summarize_background(loaded.background(), 1)
    quality = score(value_model(loaded, on), fill, net_explain(fx.net, fx.null), images, cfg, device=on)
    out = save_explainer(loaded.path, fx.net, fx.null, {**fx.meta, "quality": quality})
    registry.attach(loaded.version, out.name)  # its new sha256 recorded (and uploaded, on a store)
    return str(out)


def fit_scored(
    registry: Any, version: str | None, data_src: str, fit_cfg: Any, cfg: QualityConfig, *, progress: bool = True
) -> str:
    """``fit-explainer``: fit (:func:`training.fastshap.run`), then score before the file is written,
    with the fitting marker in the version's folder all along (the API answers "fitting, about N
    minutes left" meanwhile). ``cfg.images`` 0: not scored (the service will refuse the explainer)."""
    from shapcore.explainer_status import fitting
    from training import fastshap

    registry.check_writable()
    version = registry.resolve(version)
    folder = registry.path(version)
    hook = fit_hook(folder, data_src, cfg, time.perf_counter()) if cfg.images else None
    expected = 60.0 * (fit_cfg.minutes + (scoring_minutes(cfg) if cfg.images else 0.0)) + 30.0  # + loading
    with fitting(folder, seconds=expected, data=data_src):
        return fastshap.run(registry, version, data_src, fit_cfg, progress=progress, score=hook)
