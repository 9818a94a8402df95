"""POST /predict: classify one or several uploaded images.

No ``from __future__ import annotations`` here: the route is declared inside
:func:`build_router` and FastAPI reads its parameter annotations as objects.
"""

import asyncio
import json
import time
from typing import Annotated

import torch
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from service import metrics
from service.deps import StateDep
from service.errors import error_responses
from service.schemas import PredictResponse
from service.settings import Settings
from service.state import ServiceState
from service.uploads import BINARY_ITEMS, Upload, UploadRoute, read_upload
from shapcore.errors import InputError, ShapserveError
from shapcore.images import image_to_tensor


def _decode(data: bytes, max_pixels: int) -> torch.Tensor:
    start = time.perf_counter()
    tensor = image_to_tensor(data, max_pixels).unsqueeze(0)
    metrics.DECODE_LATENCY.observe(time.perf_counter() - start)
    return tensor


def _top_k(row: list[float], labels: list[str], k: int) -> list[dict]:
    order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
    return [{"label": labels[i], "index": i, "probability": round(row[i], 6)} for i in order]


async def _decode_all(state: ServiceState, uploads: list[Upload]) -> torch.Tensor:
    loop = asyncio.get_running_loop()
    max_pixels = state.settings.max_image_pixels
    if len(uploads) == 1:
        return await loop.run_in_executor(state.decode_executor, _decode, uploads[0].data, max_pixels)
    jobs = [loop.run_in_executor(state.decode_executor, _decode, u.data, max_pixels) for u in uploads]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, (upload, result) in enumerate(zip(uploads, results, strict=True)):
        if isinstance(result, InputError):
            name = f" ({upload.filename!r})" if upload.filename else ""
            raise InputError(result.status, result.code, f"file #{i + 1}{name}: {result.message}")
        if isinstance(result, BaseException):
            raise result
    return await loop.run_in_executor(state.decode_executor, torch.cat, results)


def build_router(settings: Settings) -> APIRouter:
    """The /predict router; the file count's bound in its OpenAPI is ``settings``'."""
    router = APIRouter(tags=["predict"], route_class=UploadRoute)
    files = File(
        min_length=1,
        max_length=settings.max_files_per_request,
        json_schema_extra=BINARY_ITEMS,
        description="One image (PNG, JPEG, WebP, GIF, BMP or TIFF) per `file` field; repeat the field for several.",
    )

    @router.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        summary="Classify images",
        description="Multipart field `file` holding one image (repeat the field for several). Answers the `top_k` "
        "most probable classes. Greyscale, palette, RGBA, 16-bit, CMYK, animated (first frame) and EXIF-rotated "
        "images are converted to upright RGB and reduced to CIFAR's 32x32, as the training images were.",
        responses=error_responses(400, 413, 415, 422, 503),
    )
    async def predict(
        state: StateDep,
        file: Annotated[list[UploadFile], files],
        top_k: Annotated[int, Query(ge=1, le=10, description="How many classes to return, most probable first.")] = 3,
    ) -> Response:
        return await _predict(state, file, top_k)

    return router


async def _predict(state: ServiceState, files: list[UploadFile], top_k: int) -> Response:
    start = time.perf_counter()
    if state.engine.current is None:
        raise ShapserveError(503, "model_not_ready", "the model is still loading", headers={"Retry-After": "1"})
    uploads = [await read_upload(f) for f in files]
    with state.batcher.expect(len(uploads)):
        images = await _decode_all(state, uploads)
    served, rows = await state.batcher.submit(images)
    labels = served.class_names
    body: dict = {"model": {"name": served.name, "version": served.version}}
    if len(uploads) == 1:
        body["predictions"] = _top_k(rows[0], labels, top_k)
    else:
        body["results"] = [
            {"filename": u.filename, "predictions": _top_k(row, labels, top_k)}
            for u, row in zip(uploads, rows, strict=True)
        ]
    body["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
    return Response(json.dumps(body), media_type="application/json")
