"""Service configuration, read from the environment (pydantic-settings).

The service family of :class:`shapcore.settings.SharedSettings`, which declares what the API
shares with the explanation workers (``REDIS_URL``, ``MODEL_REGISTRY``, ``MODEL_VERSION``,
``MAX_IMAGE_PIXELS``). Every field is set by the environment variable of the same name in upper
case (``MAX_UPLOAD_BYTES=5000000``); a ``.env`` file in the working directory is read too.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator

from shapcore.settings import BlankIsNone, RuntimeName, SharedSettings


class Settings(SharedSettings):
    """The API's own variables, beside the shared ones (:class:`shapcore.settings.SharedSettings`)."""

    # -- server ------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface uvicorn binds to (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(False, description="uvicorn's per-request access log (off: it costs throughput).")

    # -- model (MODEL_REGISTRY, MODEL_VERSION: shared) ---------------------------------
    model_watch_interval_s: float = Field(
        0.0,
        ge=0,
        description="Poll the registry's PROMOTED pointer this often and switch when it moves (0: off). "
        "Ignored when MODEL_VERSION pins a version.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads for inference (0: all cores but one).")
    runtime: RuntimeName = Field(
        "auto",
        description="auto: at load, time every runtime this process can run (bf16, torch.compile, ONNX Runtime, "
        "OpenVINO, int8) against fp32 TorchScript at the batcher's sizes and keep the fastest that is >= 1.1x "
        "faster and whose top-1 agrees with fp32 on >= 99.5 % of the version's validation sample "
        "(shapcore/gate.py); a name: that runtime, unmeasured (an error when it cannot run here).",
    )
    jit: bool = Field(
        True,
        description="Trace + freeze the model for inference (folds batch norm into the convolutions and "
        "pre-packs the weights: faster on CPU, same predictions). Off: plain eager model.",
    )
    warmup: bool = Field(True, description="Run warm-up forwards before reporting ready.")
    explain_fast_min_rho: float = Field(
        0.8,
        ge=-1.0,
        le=1.0,
        description="method=fast serves a version's amortised explainer only when its fit measured a median Spearman "
        "rho against KernelSHAP at least this high (its metadata's quality figures); below it, or without figures, "
        "409 naming the figure and the command that refits it. -1: serve any scored explainer.",
    )

    # -- inputs (MAX_IMAGE_PIXELS: shared) -------------------------------------------
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest request body, refused while streaming.")
    max_files_per_request: int = Field(16, ge=1, description="Most `file` fields in one /predict request.")
    decode_threads: int = Field(0, ge=0, description="Threads that decode and resize uploads (0: half the cores, 1-4).")

    # -- dynamic batching ----------------------------------------------------------
    batching: bool = Field(True, description="Group concurrent requests into one forward pass.")
    batch_max_size: int = Field(32, ge=1, description="Most images in one forward pass.")
    inference_workers: int = Field(
        1,
        ge=1,
        le=16,
        description="Forward passes that may run at once, each on its own thread (1: one at a time, the "
        "largest batches; 2 on a 2-core CPU: two single-threaded passes side by side).",
    )
    predict_queue_budget_ms: float = Field(
        500.0,
        ge=0,
        description="Longest a /predict request may expect to wait for its answer (the work ahead of it at the "
        "recent images/s, plus its own batch, a full one under overload); beyond it the request is refused before "
        "its upload is read, 503 overloaded with Retry-After (service/overload.py). An idle service refuses nothing. "
        "0: never refuse.",
    )
    predict_refusals_per_s: float = Field(
        200.0,
        ge=0,
        description="Overload refusals sent at once per second; beyond, each waits its turn (at most 10 s, and its "
        "Retry-After says so), so that clients retrying at once cannot keep the event loop busy refusing (0: no pace).",
    )
    batch_max_wait_ms: float = Field(
        15.0,
        ge=0,
        description="Longest a batch waits for company: requests being decoded, or as many images as were "
        "recently in flight at the peak. A request that finds the service idle never waits. (At 32 px "
        "the event loop spends about 0.8 ms per request, so 16 concurrent requests need ~13 ms to "
        "gather: at 5 ms the batches at C=16 were 9.4 images on average, at 15 ms 16.)",
    )

    # -- authentication (service/auth.py) ----------------------------------------------
    api_keys: str = Field(
        "", description="API key entries `name:sha256hex[:admin]`, separated by commas or whitespace (hashes only)."
    )
    api_keys_file: Annotated[Path | None, BlankIsNone] = Field(
        None, description="File of API key entries, one `name:sha256hex[:admin]` per line, `#` comments."
    )
    require_api_keys: bool = Field(
        False, description="Refuse to start when no API key is configured (off: the API is open, with a warning)."
    )

    # -- limits (service/ratelimit.py, service/timeout.py) -------------------------------
    rate_limit_predict: str = Field(
        "",
        description="Per-key (client address without keys) limit on POST /predict, e.g. `1200/minute` or "
        "`20/second;1000/minute`; shared by the replicas through Redis. Empty: no limit.",
    )
    rate_limit_explain: str = Field("", description="The same for POST /explain, e.g. `60/minute`. Empty: no limit.")
    rate_limit_redis_timeout_s: float = Field(
        0.25, gt=0, description="Longest wait for the rate-limit counters in Redis before counting in memory."
    )
    request_timeout_s: float = Field(
        60.0, ge=0, description="Longest a request may take, upload included: then 503 `request_timeout` (0: none)."
    )
    max_concurrent_requests: int = Field(
        256,
        ge=0,
        description="Requests in flight (this one included) at which a new one is refused with 503 before its "
        "upload is read (service/overload.py; idle keep-alive connections do not count; 0: no limit).",
    )
    max_connections: int = Field(
        2048,
        ge=0,
        description="uvicorn's limit_concurrency: open connections (idle keep-alive ones and refusals waiting for "
        "their turn included) beyond which it answers 503 and closes the connection (0: no limit).",
    )
    listen_backlog: int = Field(
        256, ge=1, description="Connections the kernel queues before the server accepts them (uvicorn's backlog)."
    )

    @field_validator("rate_limit_predict", "rate_limit_explain")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        value = value.strip()
        if value:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a rate limit: use e.g. `60/minute`, `10/second`, `1000 per hour`, "
                    "several separated by `;`"
                ) from None
        return value

    def resolved_torch_threads(self) -> int:
        """0 -> all cores but one, shared by the inference workers, at least one (see BENCHMARKS.md).

        The spare core runs the event loop and the decoding. An OpenMP team as wide as the
        machine collapses as soon as anything else wants a core: every parallel region waits
        for its slowest (preempted) thread. On 2 cores, 2 threads made the service ~5x slower.
        """
        if self.torch_threads:
            return self.torch_threads
        return max(1, (len(os.sched_getaffinity(0)) - 1) // self.inference_workers)

    def resolved_decode_threads(self) -> int:
        """0 -> half the cores, 1 to 4: decoding a small upload takes ~0.1-0.2 ms, and each extra
        thread competes with the forward pass for the same cores."""
        if self.decode_threads:
            return self.decode_threads
        return min(4, max(1, len(os.sched_getaffinity(0)) // 2))


@lru_cache
def get_settings() -> Settings:
    return Settings()


def redact_url(url: str) -> str:
    """redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0 (for logs and answers)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
