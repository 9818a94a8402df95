"""The shared core (``shapcore``) in-process: decoder, heatmap, precision gate, faithfulness
curves, the amortised explainer and the explanation options. No server, no worker."""

from __future__ import annotations

import io

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def cat_rgb(cifar_jpeg: bytes) -> Image.Image:
    """The real CIFAR-10 cat, decoded to 8-bit RGB by Pillow alone (not by the code under test)."""
    return Image.open(io.BytesIO(cifar_jpeg)).convert("RGB")
