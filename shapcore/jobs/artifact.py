"""What a finished job leaves beside its result for the pictures: the explained picture, the
players' map and the pixel methods' maps (under :func:`~shapcore.jobs.keys.artifact_key`), and
the players' map as the 16-bit PNG that ``GET /explain/{id}/segments.png`` serves.
NumPy and Pillow only (the API reads these)."""

from __future__ import annotations

import io

import numpy as np

#: The most players a 16-bit map can number.
MAX_PLAYERS = 2**16


def pack_artifact(image: np.ndarray, labels: np.ndarray, pixel_maps: np.ndarray | None = None) -> bytes:
    """The heatmap's data: the segmented pixels, the superpixel labels and, for the pixel
    methods, their (classes, 32, 32) attribution maps (drawn instead of the superpixel values)."""
    buf = io.BytesIO()
    arrays = {"image": image.astype(np.uint8), "labels": labels.astype(np.int32)}
    if pixel_maps is not None:
        arrays["pixel_maps"] = pixel_maps.astype(np.float32)
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def unpack_artifact(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["image"], npz["labels"], npz["pixel_maps"] if "pixel_maps" in npz.files else None


def players_png(labels: np.ndarray) -> bytes:
    """The players' map as a 16-bit greyscale PNG of the explained picture's size: pixel value
    ``i`` is player ``i``, the index into ``shap_values``."""
    from PIL import Image

    if labels.size and (labels.min() < 0 or labels.max() >= MAX_PLAYERS):
        raise ValueError(f"player indices must be within 0..{MAX_PLAYERS - 1}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()
