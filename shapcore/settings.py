"""The settings base every room's pydantic-settings family inherits, and its helpers.

One environment configures every process of a deployment: the API (``service.settings.Settings``),
the explanation workers and the explain endpoints (``shapcore.jobs.settings.ExplainSettings``)
and training (``training.settings.TrainingSettings``). The variables they share (``REDIS_URL``,
``MODEL_REGISTRY``, ``MODEL_VERSION``, ``MAX_IMAGE_PIXELS``) are declared once, here, with one
default and one meaning; each family adds its own. Every field is set by the environment
variable of the same name in upper case, and a ``.env`` file in the working directory is read
too. This module imports neither torch nor a room (the API's light path imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


def _path_unless_url(value: object) -> object:
    """A URL (``s3://bucket/prefix``) stays a string (``Path`` would fold its ``//``), a path becomes a Path."""
    if isinstance(value, str) and "://" not in value:
        return Path(value)
    return value


#: An optional setting that an empty variable (``MODEL_VERSION=``, as compose passes one) unsets.
BlankIsNone = BeforeValidator(_blank_is_none)

Family = TypeVar("Family", bound="SharedSettings")

#: What ``RUNTIME`` (API) and ``EXPLAIN_RUNTIME`` (workers) take: ``auto`` (chosen by measurement at
#: load, shapcore/gate.py) or one form of the model by name (shapcore/runtimes.py).
RuntimeName = Literal["auto", "torchscript", "bf16", "compile", "onnxruntime", "openvino", "int8", "openvino-int8"]


class SharedSettings(BaseSettings):
    """The variables every process reads alike; the families below it add their own."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        protected_namespaces=(),  # fields named model_* are ours, not pydantic's
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the explanation queue, its jobs and results, and the API's shared rate-limit "
        "counters; reported by /readyz; never needed by /predict.",
    )
    model_registry: Annotated[Path | str, BeforeValidator(_path_unless_url)] = Field(
        Path("./models"),
        description="The checkpoint registry: a folder, or S3-compatible storage as s3://bucket/prefix (endpoint "
        "and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).",
    )
    model_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "shapserve" / "registry",
        description="Where the readers of an s3:// registry keep their copies of its versions (by version, "
        "each file checked against its sha256 at every load); unused by a folder registry.",
    )
    model_version: Annotated[str | None, BlankIsNone] = Field(
        None, description="Version to serve and explain; unset: the promoted version, else the newest."
    )
    runtime_candidates: Annotated[str | None, BlankIsNone] = Field(
        None,
        description="Comma-separated runtimes that RUNTIME=auto / EXPLAIN_RUNTIME=auto measure (e.g. "
        "'onnxruntime,openvino'); unset: every one but compile. The others are reported as skipped.",
        pattern=r"^\s*(torchscript|bf16|compile|onnxruntime|openvino|int8|openvino-int8)(\s*,\s*(torchscript|bf16|"
        r"compile|onnxruntime|openvino|int8|openvino-int8))*\s*$",
    )
    runtime_cache_dir: Path = Field(
        Path("./var/runtime-cache"),
        description="Where a version's exported and quantised forms (ONNX, int8) are kept when its registry "
        "folder is read-only; otherwise they are kept in the version's folder, under runtimes/.",
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=1,
        description="Largest image (width x height, from its header), refused before decoding: uploads to "
        "/predict and /explain alike.",
    )

    def shared(self) -> dict[str, Any]:
        """The values of the shared variables, as this object holds them."""
        return {name: getattr(self, name) for name in SharedSettings.model_fields}

    def family(self, cls: type[Family]) -> Family:
        """Another family's settings read from the environment, with this object's shared values.

        One process that needs two families (the API also submits explanation jobs) gets one
        connection, registry, version and pixel limit for both, also when this object was built
        in code rather than from the environment (``create_app(Settings(redis_url=...))``).
        """
        return cls(**self.shared())
