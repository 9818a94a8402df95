"""One explanation of one image: the computation behind ``POST /explain``.

No Redis and no RQ here: :func:`explain_image` takes a runtime (the model and its
backgrounds: the worker's :class:`worker.runtime.VersionRuntime`, or a :class:`ModelRuntime`
in tests and ``bench/``), the checked request and the decoded image, and returns plain Python
data, so the worker, the tests and ``bench/`` run exactly the same code.

The pattern (as in the shap docs' image example)
-------------------------------------------------
The *players* are the M superpixels of the image (:mod:`worker.segmentation`). A coalition
``z ∈ {0,1}^M`` keeps the superpixels with ``z_j = 1`` and hides the others behind the
background; its value is the model's class probabilities on that masked image, averaged
over the background images (:mod:`shapcore.value`). The method (:mod:`worker.methods`, one module per method:
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
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from shapcore.background import BackgroundSet
from shapcore.explain.background import BackgroundSpec, parse_background
from shapcore.explain.methods import get_method
from shapcore.explain.request import ExplainRequest, min_samples
from shapcore.explain.result import attribution_fields
from shapcore.faithfulness import faithfulness
from shapcore.value import CoalitionModel
from worker.methods import Attribution, MethodContext, run_method
from worker.methods.kernel import coalition_budget
from worker.segmentation import Segmentation, grid_segmentation, segment

#: ``progress(fraction in [0, 1], stage)``
ProgressFn = Callable[[float, str], None]


class ExplainRuntime(Protocol):
    """What an explanation needs beside the request: the model (frozen or not), its autograd
    copy for the gradient methods, the class names, the device, and the background of a spec."""

    model: Any
    autograd_model: torch.nn.Module | None
    class_names: list[str]
    device: torch.device | str

    def background(self, spec: BackgroundSpec, model_input: torch.Tensor) -> BackgroundSet: ...


@dataclass
class ModelRuntime:
    """The simplest runtime: one model and one background set, whatever the spec (tests, ``bench/``)."""

    model: Any
    class_names: list[str]
    fill: BackgroundSet
    autograd_model: torch.nn.Module | None = None
    device: torch.device | str = "cpu"

    def background(self, spec: BackgroundSpec, model_input: torch.Tensor) -> BackgroundSet:
        return self.fill


@dataclass(frozen=True)
class Explanation:
    """:func:`explain_image`'s answer: the JSON-ready result, the players, the attribution."""

    result: dict[str, Any]
    segmentation: Segmentation
    attribution: Attribution

    def __iter__(self):  # (result, segmentation, attribution) = explain_image(...)
        return iter((self.result, self.segmentation, self.attribution))


def explain_image(
    runtime: ExplainRuntime,
    request: ExplainRequest,
    image: Image.Image,
    model_input: torch.Tensor,
    *,
    batch_size: int = 256,
    slic_max_side: int = 512,
    progress: ProgressFn | None = None,
) -> Explanation:
    """Explain ``runtime``'s model on one image as ``request`` says.

    ``image``: the decoded upload (any size, RGB); ``model_input``: uint8 (3, 32, 32), the
    tensor /predict would feed the model for the same upload.
    """
    started = time.perf_counter()
    if progress:
        progress(0.0, "segmenting")
    if request.players == "grid":
        seg = grid_segmentation(image, max_side=slic_max_side)
    else:
        seg = segment(image, request.segments, max_side=slic_max_side, compactness=request.slic_compactness)
    segmented = time.perf_counter()
    method = get_method(request.method)
    m = seg.count
    samples = request.budget  # the fixed budget, or the cap of samples=auto
    if method.sampled and m > 1:
        samples = max(samples, min_samples(m))  # SLIC gave more superpixels than asked for
    expected_rows = 2 + coalition_budget(m, samples) if m > 1 else 2
    last = [0.0]

    def on_rows(rows: int) -> None:
        now = time.perf_counter()
        if progress and now - last[0] >= 0.5:
            last[0] = now
            progress(min(0.95, 0.02 + 0.93 * rows / expected_rows), "evaluating")

    background = runtime.background(parse_background(request.background), model_input)
    f = CoalitionModel(runtime.model, model_input, seg.weights, background, batch_size=batch_size,
                       progress=on_rows, device=runtime.device)  # fmt: skip
    if progress:
        progress(0.02, "evaluating")
    target = int(np.argmax(f.fx())) if request.target is None else int(request.target)
    ctx = MethodContext(f=f, autograd_model=runtime.autograd_model, samples=samples, seed=request.seed,
                        target=target, auto=request.auto)  # fmt: skip
    attribution = run_method(request.method, ctx)
    explained = time.perf_counter()
    explain_evaluations = f.evaluations
    f.progress = None
    if progress:
        progress(0.96, "faithfulness")
    faith = faithfulness(f, attribution.phi[:, target], target, seed=request.seed)
    finished = time.perf_counter()
    timings = {"segmentation": segmented - started, "explainer": explained - segmented,
               "faithfulness": finished - explained, "model_forward": f.forward_seconds}  # fmt: skip
    result = _result(request, runtime.class_names, seg, attribution, target, samples, len(background), timings)
    result["model_evaluations"] = explain_evaluations + int(attribution.extra.get("gradient_evaluations", 0))
    result["faithfulness_evaluations"] = f.evaluations - explain_evaluations
    result["faithfulness"] = faith
    result["duration_s"] = finished - started
    result["evaluations_per_second"] = f.evaluations / f.forward_seconds if f.forward_seconds > 0 else math.nan
    if progress:
        progress(1.0, "finished")
    return Explanation(result, seg, attribution)


def _result(
    request: ExplainRequest,
    class_names: list[str],
    seg: Segmentation,
    a: Attribution,
    target: int,
    samples: int,
    background_images: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON-ready result (:class:`shapcore.explain.result.ExplainResult`'s fields) but the counts."""
    method = get_method(request.method)
    return {
        "method": request.method,
        "players": request.players,
        **attribution_fields(a.phi, a.base, a.fx, class_names, target, efficient=method.efficient, stderr=a.stderr),
        "convergence": a.convergence,
        "segments": {"requested": request.segments, "count": seg.count, "height": int(seg.labels.shape[0]),
                     "width": int(seg.labels.shape[1])},
        "samples": a.coalitions,
        "samples_requested": request.samples,
        "samples_raised_to": samples if samples != request.budget and method.sampled else None,
        "stopped": a.convergence.get("stopped", "budget" if method.sampled else None),
        "evaluations": a.coalitions,
        "background": request.background,
        "background_images": background_images,
        "seed": request.seed,
        "timings_s": timings,
        **a.extra,
    }
