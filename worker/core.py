"""Superpixel KernelSHAP for one image: the computation behind ``POST /explain``.

No Redis and no RQ here: :func:`explain_image` takes a decoded image, a model and a
background set and returns plain Python data, so the worker, the tests and ``bench/`` run
exactly the same code.

The pattern (as in the shap docs' image example)
-------------------------------------------------
The *players* are the M superpixels of the image. A coalition ``z ∈ {0,1}^M`` keeps the
superpixels with ``z_j = 1`` and hides the others behind background pixels; its value is
the model's class probabilities on that masked image, averaged over the background images
(weights from :class:`BackgroundSet`). ``shap.KernelExplainer(f, data=np.zeros((1, M)))``
explains the instance ``np.ones((1, M))`` with ``l1_reg=False``, so every superpixel gets a
value and local accuracy holds: ``E[f] + Σφ = f(x)`` (the residual is computed and reported).

What is different from the docs' example is only *how* ``f`` is computed: it receives the
whole (K, M) coalition matrix that KernelExplainer built, turns it into K×B masked images
with one matrix product and one broadcast blend (no Python loop over coalitions or
segments), and runs the model on them in large batches under ``torch.inference_mode``.

Segmentation at the upload's own resolution
-------------------------------------------
SLIC runs on the decoded upload (reduced first only when its longer side is over
``slic_max_side``, to keep SLIC fast), not on the 32×32 model input: superpixels follow
the picture's real edges and the heatmap can be drawn at that resolution. The model sees
32×32 images (``shapcore.model.to_source_size``), so each superpixel becomes an
*area-weight map* at 32×32: ``A[j, p]`` = the fraction of model pixel ``p``'s footprint
covered by superpixel ``j`` (rows of A sum to one per pixel). A coalition's model input is
``x ⊙ w + bg ⊙ (1 − w)`` with ``w = z·A``. For a 32×32 upload A is a 0/1 matrix and this is
exactly the docs' hard masking; for larger uploads a model pixel straddling two superpixels
is blended in proportion, which is what reducing a masked full-size image would give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from shapcore.images import fit_within
from shapcore.model import SOURCE_SIZE
from worker.background import BackgroundSet

#: ``progress(fraction in [0, 1], stage)``
ProgressFn = Callable[[float, str], None]


# -- segmentation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segmentation:
    """SLIC superpixels of one image.

    ``image``: the RGB pixels that were segmented (uint8, H×W×3); ``labels``: H×W int32 in
    ``0..M-1``; ``weights``: float32 (M, 32·32) area weights at the model's resolution.
    """

    image: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    @property
    def count(self) -> int:
        return int(self.weights.shape[0])


def segment(image: Image.Image, n_segments: int, *, max_side: int = 512, compactness: float = 10.0) -> Segmentation:
    """SLIC (scikit-image) on the image at its own resolution (reduced to ``max_side`` if larger)."""
    from skimage.segmentation import slic

    rgb = fit_within(image.convert("RGB"), max_side)
    pixels = np.asarray(rgb, dtype=np.uint8)
    best: np.ndarray | None = None
    # SLIC's count is approximate (its grid, then merging of tiny regions): on a 32x32
    # CIFAR image 50 asked gives ~30. Ask for a little more until the count is within 5%
    # (or over); keep the closest. A handful of milliseconds at 32 px.
    for factor in _SLIC_OVERSHOOT:
        raw = slic(
            pixels,
            n_segments=max(2, round(n_segments * factor)),
            compactness=compactness,
            start_label=0,
            channel_axis=-1,
        )
        count = len(np.unique(raw))
        if best is None or abs(count - n_segments) < abs(int(best.max()) + 1 - n_segments):
            # SLIC may skip label numbers: make them 0..M-1.
            _, inverse = np.unique(raw, return_inverse=True)
            best = inverse.reshape(raw.shape).astype(np.int32)
        if count > n_segments or abs(count - n_segments) <= max(1, 0.05 * n_segments):
            break
    assert best is not None
    return Segmentation(image=pixels, labels=best, weights=area_weights(best, SOURCE_SIZE))


_SLIC_OVERSHOOT = (1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5)


def area_weights(labels: np.ndarray, size: int = SOURCE_SIZE) -> np.ndarray:
    """(M, size·size): share of each model pixel's footprint covered by each superpixel.

    Pixel (y, x) of an H×W label map falls in model cell (y·size // H, x·size // W), the
    same partition an area reduction uses; one ``bincount`` does the whole map.
    """
    height, width = labels.shape
    count = int(labels.max()) + 1
    rows = (np.arange(height) * size) // height
    cols = (np.arange(width) * size) // width
    cell = rows[:, None] * size + cols[None, :]
    hist = np.bincount((cell * count + labels).ravel(), minlength=size * size * count)
    hist = hist.reshape(size * size, count).astype(np.float64)
    totals = hist.sum(axis=1, keepdims=True)
    if np.any(totals == 0):  # an image smaller than the model input: nearest cell instead
        rows = np.minimum((np.arange(size) * height) // size, height - 1)
        cols = np.minimum((np.arange(size) * width) // size, width - 1)
        nearest = labels[rows][:, cols].ravel()
        hist = np.zeros((size * size, count))
        hist[np.arange(size * size), nearest] = 1.0
        totals = hist.sum(axis=1, keepdims=True)
    return np.ascontiguousarray((hist / totals).T, dtype=np.float32)


# -- the value function -------------------------------------------------------------------------


class CoalitionModel:
    """``f(Z)``: (K, M) coalitions -> (K, classes) probabilities, background-averaged.

    Masking is one matrix product (``Z @ A`` -> per-pixel keep weights) and one broadcast
    blend to K×B images; the model runs on ``batch_size`` images at a time. The all-ones
    coalition (the image itself) needs one evaluation, not B.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        segmentation_weights: np.ndarray,
        background: BackgroundSet,
        *,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.x = (image.float() / 255.0 if image.dtype == torch.uint8 else image.float()).unsqueeze(0).unsqueeze(0)
        self.A = torch.from_numpy(segmentation_weights)
        self.bg = background.images.unsqueeze(0)  # (1, B, 3, H, W)
        self.bg_weights = background.weights.double()
        self.B = len(background)
        self.batch_size = max(1, int(batch_size))
        self.rows_per_batch = max(1, self.batch_size // self.B)
        self.progress = progress
        self.evaluations = 0
        self.rows = 0
        self.forward_seconds = 0.0
        self._fx: np.ndarray | None = None

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(self.model(images).float(), dim=-1)
        self.forward_seconds += time.perf_counter() - start
        self.evaluations += int(images.shape[0])
        return probs

    def fx(self) -> np.ndarray:
        if self._fx is None:
            self._fx = self._forward(self.x[0]).double().numpy()[0]
        return self._fx

    def masked_images(self, coalitions: torch.Tensor) -> torch.Tensor:
        """(k, M) float coalitions -> (k·B, 3, 32, 32) float images in [0, 1]."""
        side = self.x.shape[-1]
        w = (coalitions @ self.A).view(-1, 1, 1, side, side)  # keep-weight per pixel
        images = self.x * w + self.bg * (1.0 - w)  # (k, B, 3, H, W); exact 0/1 masking for 0/1 weights
        return images.reshape(-1, *self.x.shape[2:])

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float32)
        out = np.empty((Z.shape[0], self.fx().shape[0]), dtype=np.float64)
        full = Z.min(axis=1) >= 1.0
        out[full] = self.fx()
        rest = np.flatnonzero(~full)
        for start in range(0, len(rest), self.rows_per_batch):
            rows = rest[start : start + self.rows_per_batch]
            images = self.masked_images(torch.from_numpy(Z[rows]))
            probs = self._forward(images).double().view(len(rows), self.B, -1)
            out[rows] = (probs * self.bg_weights.view(1, -1, 1)).sum(dim=1).numpy()
            self.rows += len(rows)
            if self.progress is not None:
                self.progress(self.rows)
        self.rows += int(full.sum())
        return out


# -- KernelSHAP ------------------------------------------------------------------------------------


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """KernelExplainer draws coalitions from NumPy's global generator: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def coalition_budget(segments: int, samples: int) -> int:
    """Coalitions KernelExplainer will actually evaluate: it stops at all 2^M − 2 proper subsets."""
    return min(samples, 2**segments - 2) if segments <= 30 else samples


def kernel_shap(f: Callable[[np.ndarray], np.ndarray], m: int, samples: int, seed: int) -> dict[str, Any]:
    """``shap.KernelExplainer`` over M players with the all-hidden reference, ``l1_reg`` off.

    Returns ``phi`` (M, C), ``base`` (C,), ``fx`` (C,) and ``coalitions`` (evaluated).
    """
    import shap

    with seeded_numpy(seed):
        explainer = shap.KernelExplainer(f, np.zeros((1, m)))
        phi = explainer.shap_values(np.ones((1, m)), nsamples=samples, l1_reg=False, silent=True)
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 3:  # (1, M, C)
        phi = phi[0]
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64))
    fx = np.atleast_1d(np.asarray(explainer.fx, dtype=np.float64))
    coalitions = int(explainer.nsamplesAdded) if m > 1 else 0
    return {"phi": phi.reshape(m, -1), "base": base, "fx": fx, "coalitions": coalitions}


@dataclass(frozen=True)
class ExplainParams:
    segments: int
    samples: int
    background: int
    seed: int
    target: int | None = None  # None: the top-1 prediction


def explain_image(
    model: torch.nn.Module,
    image: Image.Image,
    model_input: torch.Tensor,
    background: BackgroundSet,
    class_names: list[str],
    params: ExplainParams,
    *,
    batch_size: int = 256,
    slic_max_side: int = 512,
    slic_compactness: float = 10.0,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], Segmentation]:
    """Explain ``model`` on one image; returns (JSON-ready result, segmentation).

    ``image``: the decoded upload (any size, RGB); ``model_input``: uint8 (3, 32, 32), the
    tensor /predict would feed the model for the same upload.
    """
    started = time.perf_counter()
    if progress:
        progress(0.0, "segmenting")
    seg = segment(image, params.segments, max_side=slic_max_side, compactness=slic_compactness)
    segmented = time.perf_counter()
    m = seg.count
    expected_rows = 2 + coalition_budget(m, params.samples) if m > 1 else 2
    last = [0.0]

    def on_rows(rows: int) -> None:
        now = time.perf_counter()
        if progress and now - last[0] >= 0.5:
            last[0] = now
            progress(min(0.99, 0.02 + 0.97 * rows / expected_rows), "evaluating")

    f = CoalitionModel(model, model_input, seg.weights, background, batch_size=batch_size, progress=on_rows)
    if progress:
        progress(0.02, "evaluating")
    shap_out = kernel_shap(f, m, params.samples, params.seed)
    finished = time.perf_counter()

    timings = {
        "segmentation": segmented - started,
        "model_forward": f.forward_seconds,
        "other": max(0.0, finished - segmented - f.forward_seconds),
    }
    result = _result(shap_out, seg, params, class_names, len(background), f.evaluations, finished - started, timings)
    if progress:
        progress(1.0, "finished")
    return result, seg


def _result(
    shap_out: dict[str, Any],
    seg: Segmentation,
    params: ExplainParams,
    class_names: list[str],
    background: int,
    evaluations: int,
    duration: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON-ready result of :func:`explain_image`: the target class first, then every class."""
    phi, base, fx = shap_out["phi"], shap_out["base"], shap_out["fx"]
    m = seg.count
    predicted = int(np.argmax(fx))
    target = predicted if params.target is None else int(params.target)
    residuals = np.abs(base + phi.sum(axis=0) - fx)
    classes = [
        {
            "index": c,
            "label": class_names[c],
            "probability": float(fx[c]),
            "base_value": float(base[c]),
            "shap_values": [float(v) for v in phi[:, c]],
            "local_accuracy_residual": float(residuals[c]),
        }
        for c in range(len(class_names))
    ]
    result = {
        "target": {"index": target, "label": class_names[target], "probability": float(fx[target])},
        "predicted": {"index": predicted, "label": class_names[predicted], "probability": float(fx[predicted])},
        "base_value": float(base[target]),
        "shap_values": [float(v) for v in phi[:, target]],
        "local_accuracy_residual": float(residuals[target]),
        "max_local_accuracy_residual": float(residuals.max()),
        "segments": {
            "requested": params.segments,
            "count": m,
            "height": int(seg.labels.shape[0]),
            "width": int(seg.labels.shape[1]),
        },
        "samples": shap_out["coalitions"],
        "samples_requested": params.samples,
        "background": background,
        "seed": params.seed,
        "model_evaluations": evaluations,
        "duration_s": duration,
        "timings_s": timings,
        "evaluations_per_second": evaluations / duration if duration > 0 else math.nan,
        "classes": classes,
    }
    return result
