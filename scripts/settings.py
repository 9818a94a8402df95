"""Every variable the scripts read from the environment, read here and nowhere else in scripts/.

``scripts/run.py`` (``make run``, ``make train``) with its steps and supervisor reads
:class:`RunSettings`, the container's health check :class:`HealthSettings`. Standard library
only: the launcher starts before (and without) the project's heavy imports, and the health
check runs every few seconds. A variable is read as stripped text and an empty one is unset
(its default), as compose passes unset ones; the variables of the processes the launcher
starts (``BATCH_MAX_SIZE``, ``EXPLAIN_*``, ...) reach them unread, in their environment, and
are the project's pydantic settings' (``shapcore/settings.py`` and its families).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

#: The Redis ``make run`` uses when one answers there (``LOCAL_REDIS_URL``'s default).
DEFAULT_LOCAL_REDIS = "redis://127.0.0.1:6379/0"

Loaded = TypeVar("Loaded")


class SettingError(ValueError):
    """A variable that does not parse; the message names it and its value."""


def variable(default: Any, name: str | None = None) -> Any:
    """A field read from the variable ``name`` (default: the field's name in upper case)."""
    return field(default=default, metadata={"env": name} if name else {})


def env_name(f: Any) -> str:
    return f.metadata.get("env") or f.name.upper()


def _parse(name: str, raw: str, kind: str) -> Any:
    """``raw`` as the field's type (its annotation, a string here): text, a number or a whole number
    (written as a number: ``PORT=8000.0`` is 8000, as the launcher always took it)."""
    if kind == "str":
        return raw
    try:
        number = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    return int(number) if kind.startswith("int") else number


def read(cls: type[Loaded]) -> Loaded:
    """``cls`` (one of the dataclasses below) with every field set from its variable, when set."""
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = env_name(f)
        raw = os.environ.get(name, "").strip()
        if raw:
            values[f.name] = _parse(name, raw, str(f.type))
    return cls(**values)


def names(cls: type) -> set[str]:
    """The variables ``cls`` reads (tests/test_deploy_config.py checks the deployment's against them)."""
    return {env_name(f) for f in fields(cls)}


@dataclass(frozen=True)
class RunSettings:
    """What ``scripts/run.py`` reads; its docstring (``scripts/run.sh help``) says what each does."""

    model_registry: str = "models"
    data: str = "cifar10"
    train_profile: str = ""  # up: cpu; train: paper on a CUDA machine, else cpu
    train_minutes: float | None = None  # up: 10 (cpu); train: the profile's own budget
    explain_fit_minutes: float = 5.0
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    explain_metrics_port: int = 0
    explain_queue: str = "explain"  # the queue whose workers up waits for (the workers' own EXPLAIN_QUEUE)
    ready_timeout_s: float = 600.0
    stop_timeout_s: float = 5.0
    var_dir: str = ""  # empty: var/ in the checkout
    run_quiet: str = ""  # anything but 0: the children's output is not mirrored on the terminal
    caller_cwd: str = variable("", "SHAPSERVE_CALLER_CWD")  # where the user ran make (run.sh sets it)
    redis_url: str = ""
    local_redis_url: str = DEFAULT_LOCAL_REDIS
    redis_server: str = ""
    embedded_redis_port: int = 0
    # The restart policy (scripts/supervise.py:RestartPolicy); unset: the policy's own default.
    restart_delay_s: float | None = None
    restart_max_delay_s: float | None = None
    restart_reset_s: float | None = None
    restart_limit: int | None = None
    restart_window_s: float | None = None

    @property
    def mirror(self) -> bool:
        return self.run_quiet in ("", "0")

    def restart_overrides(self) -> dict[str, float]:
        """The restart settings given, by RestartPolicy's field names."""
        given = {"delay_s": self.restart_delay_s, "max_delay_s": self.restart_max_delay_s,
                 "reset_after_s": self.restart_reset_s, "limit": self.restart_limit,
                 "window_s": self.restart_window_s}  # fmt: skip
        return {key: value for key, value in given.items() if value is not None}


@dataclass(frozen=True)
class HealthSettings:
    """What ``scripts/healthcheck.py`` reads: the API's port and the workers' Redis."""

    port: int = 8000
    redis_url: str = DEFAULT_LOCAL_REDIS
