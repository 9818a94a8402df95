"""Response bodies, for validation-free fast responses and for the OpenAPI documentation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictBool


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable (see service.errors and service.uploads).")
    message: str = Field(description="What is wrong, in words.")
    details: list[dict[str, Any]] | None = Field(None, description="Validation errors: the offending fields; "
                                                 "method=fast's quality refusals: the figure, its floor, the command.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


class ModelRef(BaseModel):
    name: str = Field(examples=["resnet50-cifar10"])
    version: str = Field(examples=["20261126-101500-a1b2c3"])


class Prediction(BaseModel):
    label: str = Field(examples=["cat"])
    index: int = Field(description="Class index in the checkpoint's class_names.", examples=[3])
    probability: float = Field(ge=0, le=1, examples=[0.87])


class FileResult(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class PredictResponse(BaseModel):
    """One image: ``predictions``. Several ``file`` fields: ``results``, one per image, in order."""

    model: ModelRef
    predictions: list[Prediction] | None = Field(None, description="Top-k classes, most probable first (one file).")
    results: list[FileResult] | None = Field(None, description="One entry per uploaded file, in order (several files).")
    latency_ms: float = Field(description="Time spent in the service on this request.")


class ModelInfo(BaseModel):
    name: str
    version: str
    architecture: str | None
    profile: str | None
    input_size: int | None
    class_names: list[str]
    promoted: bool
    device: str
    runtime: str = Field(description="How the forward pass runs (TorchScript-frozen, eager, bf16...).")
    runtime_choice: dict[str, Any] = Field(
        description="The runtime gate's choice (RUNTIME): which runtime runs (chosen), its precision, its "
        "speed-up over fp32 TorchScript and top-1 agreement with it on the version's validation sample, "
        "the reason, and with auto every candidate's figures (times per batch size, agreement, status)."
    )
    loaded_at: str
    load_seconds: float
    metadata: dict[str, Any]
    evaluation: dict[str, Any] | None = Field(
        description="metrics.json of the version: accuracy, macro and per-class precision/recall/F1, "
        "confusion_matrix; null if the version was never evaluated."
    )
    report_url: str | None = Field(
        None, description="GET this for the version's report (`python -m training report`); null until one is written."
    )
    explainer: dict[str, Any] | None = Field(
        None,
        description="The version's amortised explainer (method=fast on POST /explain): `available`, its players, "
        "fit time, validation figures and forward-pass time, `quality` (its figures against KernelSHAP), `served` "
        "(false below EXPLAIN_FAST_MIN_RHO or without figures, with `refused`), `fitting` while a fit runs; `error` "
        "when its file was refused; null when the "
        "version has none (`python -m training fit-explainer`).",
    )


class ReloadRequest(BaseModel):
    version: str | None = Field(
        None, description="Version id; default: MODEL_VERSION if pinned, else the promoted version, else the newest."
    )
    # Strict: 0, "no" or "false" are not booleans in JSON (lax pydantic would take them).
    force: StrictBool = Field(False, description="Reload even if this version is already served.")


class ReloadResponse(BaseModel):
    previous: str | None
    current: str
    changed: bool
    load_seconds: float


class Health(BaseModel):
    status: str


class RedisHealth(BaseModel):
    ok: bool
    url: str
    error: str | None = None


class Readiness(BaseModel):
    status: str = Field(description="ready | loading | failed")
    model: ModelRef | None = None
    error: str | None = None
    redis: RedisHealth | None = Field(None, description="Reported only; /predict never needs Redis.")
