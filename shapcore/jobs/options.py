"""What an explanation may be asked for: the methods, the background fills, the sample floor.

Shared by the API (it validates the form fields and builds the dedupe key from them) and the
worker (it runs what they name). No torch, no NumPy: the API imports this module.

Backgrounds (what fills a hidden superpixel):

- ``mean``: the per-pixel mean of the version's stored training images (the default);
- ``blur``: the image itself, Gaussian-blurred (its own colours, no edges);
- ``train:K``: K of the version's stored training images, each filling the hidden pixels in
  turn and the model's probabilities averaged over the K (``train:100`` is the study's setting);
- ``kmeans:K``: K k-means centroids of the stored images, weighted by cluster size.

Integers stay accepted as the aliases they were: ``1`` = ``mean``, ``100`` (all stored) =
``train:100``, ``2``..``99`` = ``kmeans:K``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

#: The explainers ``method`` may name. ``kernel`` is the default.
METHODS = ("kernel", "partition", "gradcam", "integrated_gradients")
#: The amortised explainer (FastSHAP): answered by the API in the request, never queued.
FAST_METHOD = "fast"
#: What ``method`` may name on POST /explain.
API_METHODS = (*METHODS, FAST_METHOD)
#: What ``players`` may name: the image's SLIC superpixels (the default) or the fixed grid of
#: ``GRID_CELLS`` x ``GRID_CELLS`` cells (:mod:`shapcore.players`), the amortised explainer's players.
PLAYER_LAYOUTS = ("slic", "grid")
GRID_CELLS = 8
#: Methods whose cost and accuracy follow ``samples`` (the others ignore it).
SAMPLED_METHODS = ("kernel", "partition")
#: Methods that need gradients, so an autograd copy of the model (not the frozen TorchScript one).
GRADIENT_METHODS = ("gradcam", "integrated_gradients")
BACKGROUND_KINDS = ("mean", "blur", "train", "kmeans")
#: Bumped whenever the worker's results change for the same request (part of the dedupe key).
EXPLAINER_REVISION = 2

_BACKGROUND = re.compile(r"(mean|blur)|(train|kmeans):([0-9]{1,4})|([0-9]{1,4})")


@dataclass(frozen=True)
class BackgroundSpec:
    """A parsed ``background``: ``kind`` and how many fill images it averages over."""

    kind: str
    count: int = 1

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("mean", "blur") else f"{self.kind}:{self.count}"

    def describe(self) -> str:
        return {
            "mean": "the per-pixel mean of the version's stored training images",
            "blur": "the image itself, Gaussian-blurred",
            "train": f"{self.count} of the version's stored training images, probabilities averaged over them",
            "kmeans": f"{self.count} k-means centroids of the version's stored training images, weighted by size",
        }[self.kind]


def parse_background(raw: str | int, stored: int) -> BackgroundSpec:
    """``mean`` | ``blur`` | ``train:K`` | ``kmeans:K`` | an integer alias; ValueError naming the choices."""
    text = str(raw).strip().lower()
    match = _BACKGROUND.fullmatch(text)
    choices = f"mean, blur, train:K or kmeans:K (K from 1 to {stored}; integers 1 to {stored} are aliases)"
    if match is None:
        raise ValueError(f"background must be one of {choices} (got {str(raw)[:40]!r})")
    if match.group(1):
        return BackgroundSpec(match.group(1))
    kind, count = (match.group(2), int(match.group(3))) if match.group(2) else (None, int(match.group(4)))
    if not 1 <= count <= stored:
        raise ValueError(f"background must be from 1 to {stored} images (got {count}); choices: {choices}")
    if kind is None:  # the integer aliases
        kind = "mean" if count == 1 else "train" if count == stored else "kmeans"
        return BackgroundSpec(kind, 1 if kind == "mean" else count)
    return BackgroundSpec(kind, count)


def min_samples(segments: int) -> int:
    """The fewest coalitions KernelSHAP may use for ``segments`` players: four per player.

    shap draws a coalition and its complement together, so S samples make about S/2
    independent draws; the weighted regression has M − 1 free values once efficiency fixes
    the last, and the bootstrap standard errors (:mod:`worker.uncertainty`) need about 2M
    draws to be calibrated (BENCHMARKS.md: at 2M samples they came out 0.55–0.6× the
    seed-to-seed spread). shap's own "auto" is 2M + 2048."""
    return 4 * int(segments)


def check_samples(method: str, samples: int, segments: int) -> None:
    """ValueError when a sampled method gets fewer than :func:`min_samples` coalitions."""
    floor = min_samples(segments)
    if method in SAMPLED_METHODS and samples < floor:
        raise ValueError(
            f"samples={samples} is too few for segments={segments}: {method} needs at least {floor} "
            f"(4 x segments; shap's own default is 2 x segments + 2048)"
        )


def check_evaluations(samples: int, background: BackgroundSpec, limit: int) -> None:
    """ValueError when ``samples`` coalitions, each averaged over ``background``'s images, cost
    more than ``limit`` model evaluations (``EXPLAIN_MAX_EVALUATIONS``)."""
    evaluations = samples * background.count
    if evaluations > limit:
        raise ValueError(
            f"samples x background images = {samples} x {background.count} = {evaluations} model evaluations, "
            f"over the limit of {limit}: lower samples or background"
        )


def explainer_fingerprint() -> dict[str, str | int]:
    """What, beside the request, decides a result: this package's and shap's versions and the
    explainer revision. Part of the dedupe key, so an upgrade never serves an older result."""
    return {
        "shapserve": _version("shapserve"),
        "shap": _version("shap"),
        "revision": EXPLAINER_REVISION,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
