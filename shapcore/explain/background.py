"""What fills a hidden player: the background.

- ``mean``: the per-pixel mean of the version's stored training images (the default);
- ``blur``: the image itself, Gaussian-blurred (its own colours, no edges);
- ``train:K``: K of the version's stored training images, each filling the hidden pixels in
  turn and the model's probabilities averaged over the K (``train:100`` is the study's setting);
- ``kmeans:K``: K k-means centroids of the stored images, weighted by cluster size.

Integers stay accepted as the aliases they were: ``1`` = ``mean``, ``100`` (all stored) =
``train:100``, ``2``..``99`` = ``kmeans:K``. "Background" is this project's one word for it
(the code that builds the images from a spec is :mod:`shapcore.background`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Background images stored with every registry version (the study's explainer background).
STORED_BACKGROUND = 100
BACKGROUND_KINDS = ("mean", "blur", "train", "kmeans")

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


def parse_background(raw: str | int, stored: int = STORED_BACKGROUND) -> BackgroundSpec:
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
