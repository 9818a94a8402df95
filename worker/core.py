"""One explanation of one image: the computation behind ``POST /explain``.

No Redis and no RQ here: :func:`explain_image` takes a decoded image, a model and a
background set and returns plain Python data, so the worker, the tests and ``bench/`` run
exactly the same code.

The pattern (as in the shap docs' image example)
-------------------------------------------------
The *players* are the M superpixels of the image (:mod:`worker.segmentation`). A coalition
``z ∈ {0,1}^M`` keeps the superpixels with ``z_j = 1`` and hides the others behind the
background; its value is the model's class probabilities on that masked image, averaged
over the background images (:mod:`shapcore.value`). The method (:mod:`worker.methods`:
KernelSHAP by default, or the partition explainer, Grad-CAM, integrated gradients) gives
every superpixel a value for every class; the deletion and insertion curves
(:mod:`shapcore.faithfulness`) then say how well the target class's values order the
superpixels, with the same fill.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from shapcore.background import BackgroundSet
from shapcore.faithfulness import faithfulness
from shapcore.jobs.options import SAMPLED_METHODS, min_samples
from shapcore.value import CoalitionModel
from worker.kernel import coalition_budget
from worker.methods import Attribution, MethodContext, run_method
from worker.segmentation import Segmentation, grid_segmentation, segment

#: Methods whose values add up to f(x) − base (integrated gradients up to its reported gap).
EFFICIENT_METHODS = ("kernel", "partition", "integrated_gradients")
#: ``progress(fraction in [0, 1], stage)``
ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class ExplainParams:
    segments: int
    samples: int
    background: str  # its name, as the result reports it (shapcore.jobs.options.BackgroundSpec.name)
    seed: int
    target: int | None = None  # None: the top-1 prediction
    method: str = "kernel"
    players: str = "slic"  # or "grid": shapcore.players


def explain_image(
    model: torch.nn.Module,
    image: Image.Image,
    model_input: torch.Tensor,
    background: BackgroundSet,
    class_names: list[str],
    params: ExplainParams,
    *,
    autograd_model: torch.nn.Module | None = None,
    batch_size: int = 256,
    slic_max_side: int = 512,
    slic_compactness: float = 10.0,
    progress: ProgressFn | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], Segmentation, Attribution]:
    """Explain ``model`` on one image; returns (JSON-ready result, segmentation, attribution).

    ``image``: the decoded upload (any size, RGB); ``model_input``: uint8 (3, 32, 32), the
    tensor /predict would feed the model for the same upload. ``autograd_model``: the same
    network with autograd, for the gradient methods. ``device``: where the models are (the
    masked images are built there).
    """
    started = time.perf_counter()
    if progress:
        progress(0.0, "segmenting")
    if params.players == "grid":
        seg = grid_segmentation(image, max_side=slic_max_side)
    else:
        seg = segment(image, params.segments, max_side=slic_max_side, compactness=slic_compactness)
    segmented = time.perf_counter()
    m = seg.count
    samples = params.samples
    if params.method in SAMPLED_METHODS and m > 1:
        samples = max(samples, min_samples(m))  # SLIC gave more superpixels than asked for
    expected_rows = 2 + coalition_budget(m, samples) if m > 1 else 2
    last = [0.0]

    def on_rows(rows: int) -> None:
        now = time.perf_counter()
        if progress and now - last[0] >= 0.5:
            last[0] = now
            progress(min(0.95, 0.02 + 0.93 * rows / expected_rows), "evaluating")

    f = CoalitionModel(model, model_input, seg.weights, background, batch_size=batch_size, progress=on_rows,
                       device=device)  # fmt: skip
    if progress:
        progress(0.02, "evaluating")
    target = int(np.argmax(f.fx())) if params.target is None else int(params.target)
    ctx = MethodContext(f=f, autograd_model=autograd_model, samples=samples, seed=params.seed, target=target)
    attribution = run_method(params.method, ctx)
    explained = time.perf_counter()
    explain_evaluations = f.evaluations
    f.progress = None
    if progress:
        progress(0.96, "faithfulness")
    faith = faithfulness(f, attribution.phi[:, target], target, seed=params.seed)
    finished = time.perf_counter()

    timings = {
        "segmentation": segmented - started,
        "explainer": explained - segmented,
        "faithfulness": finished - explained,
        "model_forward": f.forward_seconds,
    }
    result = _result(attribution, seg, params, class_names, background, target, samples, timings)
    # forward passes of the value function, plus the gradient methods' forward+backward passes
    result["model_evaluations"] = explain_evaluations + int(attribution.extra.get("gradient_evaluations", 0))
    result["faithfulness_evaluations"] = f.evaluations - explain_evaluations
    result["faithfulness"] = faith
    result["duration_s"] = finished - started
    result["evaluations_per_second"] = f.evaluations / f.forward_seconds if f.forward_seconds > 0 else math.nan
    if progress:
        progress(1.0, "finished")
    return result, seg, attribution


def _result(
    a: Attribution,
    seg: Segmentation,
    params: ExplainParams,
    class_names: list[str],
    background: BackgroundSet,
    target: int,
    samples: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON-ready result of :func:`explain_image`: the target class first, then every class."""
    phi, base, fx = a.phi, a.base, a.fx
    m = seg.count
    predicted = int(np.argmax(fx))
    # Local accuracy (base + Σφ = f(x)) is a check of the efficient methods; Grad-CAM has no
    # such property, so it reports none rather than a meaningless gap.
    residuals = np.abs(base + phi.sum(axis=0) - fx) if params.method in EFFICIENT_METHODS else None

    def residual(c: int) -> float | None:
        return None if residuals is None else float(residuals[c])

    def stderr(c: int) -> list[float] | None:
        return None if a.stderr is None else [float(v) for v in a.stderr[:, c]]

    classes = [
        {
            "index": c,
            "label": class_names[c],
            "probability": float(fx[c]),
            "base_value": float(base[c]),
            "shap_values": [float(v) for v in phi[:, c]],
            "standard_errors": stderr(c),
            "local_accuracy_residual": residual(c),
        }
        for c in range(len(class_names))
    ]
    return {
        "method": params.method,
        "players": params.players,
        "target": {"index": target, "label": class_names[target], "probability": float(fx[target])},
        "predicted": {"index": predicted, "label": class_names[predicted], "probability": float(fx[predicted])},
        "base_value": float(base[target]),
        "shap_values": [float(v) for v in phi[:, target]],
        "standard_errors": stderr(target),
        "convergence": a.convergence,
        "local_accuracy_residual": residual(target),
        "max_local_accuracy_residual": None if residuals is None else float(residuals.max()),
        "segments": {
            "requested": params.segments,
            "count": m,
            "height": int(seg.labels.shape[0]),
            "width": int(seg.labels.shape[1]),
        },
        "samples": a.coalitions,
        "samples_requested": params.samples,
        "samples_raised_to": samples if samples != params.samples and params.method in SAMPLED_METHODS else None,
        "background": params.background,
        "background_images": len(background),
        "seed": params.seed,
        "timings_s": timings,
        "classes": classes,
        **a.extra,
    }
