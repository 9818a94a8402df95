"""What a finished job leaves beside its result for the pictures: the heatmap's data and the
rendered PNGs, under ``shapserve:explain:artifact:<job id>`` and ``shapserve:explain:png:<job id>:<variant>``.
NumPy only (the API reads these)."""

from __future__ import annotations

import io

import numpy as np

from shapcore.jobs.queue import PREFIX


def artifact_key(job_id: str) -> str:
    return f"{PREFIX}artifact:{job_id}"


def png_key(job_id: str, variant: str) -> str:
    return f"{PREFIX}png:{job_id}:{variant}"


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
