"""The picture an explanation job carries: pixels the API has already decoded and checked.

The worker never decodes uploaded bytes. The API decodes the upload once
(:func:`shapcore.images.explanation_input`) and the job holds plain uint8 arrays: the upright
RGB pixels, reduced to ``EXPLAIN_SLIC_MAX_SIDE`` (what SLIC segments), and the 32x32 model
input made from the full-size picture. NumPy only: no torch, no Pillow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

#: The model input's shape (channels, height, width), as ``shapcore.model.to_source_size`` makes it.
MODEL_INPUT_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class JobImage:
    """Raw row-major uint8 bytes and their sizes (bytes rather than arrays: small, picklable, hashable)."""

    pixels: bytes
    width: int
    height: int
    model_input: bytes

    @classmethod
    def from_arrays(cls, pixels: np.ndarray, model_input: np.ndarray) -> JobImage:
        """``pixels``: uint8 H x W x 3; ``model_input``: uint8 3 x 32 x 32."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be uint8 H x W x 3, got {pixels.dtype} {pixels.shape}")
        if model_input.dtype != np.uint8 or model_input.shape != MODEL_INPUT_SHAPE:
            raise ValueError(f"the model input must be uint8 {MODEL_INPUT_SHAPE}, got {model_input.shape}")
        height, width = pixels.shape[:2]
        return cls(np.ascontiguousarray(pixels).tobytes(), width, height, np.ascontiguousarray(model_input).tobytes())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixels H x W x 3, model input 3 x 32 x 32), writable uint8 copies; ValueError if the sizes disagree."""
        if self.width < 1 or self.height < 1 or len(self.pixels) != self.width * self.height * 3:
            raise ValueError(f"{len(self.pixels)} pixel bytes do not make a {self.width}x{self.height} RGB image")
        if len(self.model_input) != int(np.prod(MODEL_INPUT_SHAPE)):
            raise ValueError(f"{len(self.model_input)} model input bytes, expected {int(np.prod(MODEL_INPUT_SHAPE))}")
        pixels = np.frombuffer(self.pixels, dtype=np.uint8).reshape(self.height, self.width, 3).copy()
        return pixels, np.frombuffer(self.model_input, dtype=np.uint8).reshape(MODEL_INPUT_SHAPE).copy()

    def digest(self) -> bytes:
        """SHA-256 of the decoded picture: two encodings of the same pixels are the same picture."""
        h = hashlib.sha256()
        h.update(f"{self.width}x{self.height}\0".encode())
        h.update(self.pixels)
        h.update(self.model_input)
        return h.digest()
