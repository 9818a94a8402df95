"""Whether a version's amortised explainer (``method=fast``) may be served: fitting, scored, good enough.

Torch-free: the API reads this for every fast request, the trainer writes it, ``scripts/`` need
not know it (they only run the commands).

- **A fit in progress**: ``python -m training fit-explainer`` writes ``explainer.fitting.json`` in
  the version's folder when it starts (when it expects to end) and removes it when it ends, so
  that the API can answer "fitting, about N minutes left" until the explainer file appears. A
  fit killed without its clean-up leaves the file behind: once its process is gone (seen from
  the same host) or past its expected end plus :data:`STALE_AFTER_S`, it is ignored.
- **Its quality**: the fit ends by scoring the explainer against KernelSHAP on held-out images
  (:mod:`training.explainer_quality`) and stores the figures in the explainer's metadata under
  ``quality``. :func:`refusal` says why an explainer is not served: no figures (fitted by older
  code), or a median Spearman ρ below the floor (``EXPLAIN_FAST_MIN_RHO``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Written in the version's folder while its explainer is being fitted (and scored).
FITTING_FILE = "explainer.fitting.json"
#: A marker this long past its expected end is a fit that died without removing it.
STALE_AFTER_S = 300.0


def fit_command(version: str, data: str = "SRC", minutes: float | None = None) -> str:
    """The command that (re)fits a version's explainer, as messages quote it."""
    budget = f" --time-budget {minutes:g}" if minutes else ""
    return f"python -m training fit-explainer --version {version} --data {data}{budget}"


def score_command(version: str, data: str = "SRC") -> str:
    """The command that scores an explainer already fitted (older code stored no figures)."""
    return f"python -m training score-explainer --version {version} --data {data}"


# -- the fit in progress ---------------------------------------------------------------------------------


def write_fitting(folder: Path, *, seconds_left: float, phase: str, data: str) -> None:
    """(Re)write the marker: the fit expects to end ``seconds_left`` from now."""
    doc = {"pid": os.getpid(), "host": socket.gethostname(), "phase": phase, "data": data, "updated": time.time(),
           "ends_by": time.time() + max(0.0, seconds_left)}  # fmt: skip
    tmp = folder / f".{FITTING_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, folder / FITTING_FILE)


@contextlib.contextmanager
def fitting(folder: Path, *, seconds: float, data: str) -> Iterator[None]:
    """The marker for the duration of a fit: written now, removed however the fit ends."""
    write_fitting(folder, seconds_left=seconds, phase="fitting", data=data)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / FITTING_FILE).unlink()


def read_fitting(folder: Path, now: float | None = None) -> dict[str, Any] | None:
    """The marker of a fit in progress with ``minutes_left`` (whole minutes, at least 1), or None
    (no fit, an unreadable marker, a stale one, or one whose process, on this host, is gone)."""
    try:
        doc = json.loads((folder / FITTING_FILE).read_text())
        ends_by = float(doc["ends_by"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = time.time() if now is None else now
    if now > ends_by + STALE_AFTER_S or (doc.get("host") == socket.gethostname() and not _alive(doc.get("pid"))):
        return None
    return {**doc, "minutes_left": max(1, math.ceil((ends_by - now) / 60.0))}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


# -- its quality -------------------------------------------------------------------------------------------


def summary(quality: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures every fast answer carries (the explainer's, KernelSHAP's beside them, how they
    were measured), without the per-image lists."""
    if not quality:
        return None
    keep = ("median_rho", "median_relative_l2", "deletion_auc", "insertion_auc", "beats_random", "images",
            "reference", "kernel", "random", "scored")  # fmt: skip
    return {k: quality[k] for k in keep if k in quality}


def refusal(meta: dict[str, Any], min_rho: float) -> tuple[str, str, list[dict[str, Any]]] | None:
    """Why an explainer with metadata ``meta`` is not served: (code, message, details), or None when
    its figures clear ``min_rho`` (the median Spearman ρ against KernelSHAP)."""
    version = str(meta.get("model_version", "?"))
    data = str((meta.get("data") or {}).get("source") or "SRC")
    quality = meta.get("quality")
    rho = quality.get("median_rho") if isinstance(quality, dict) else None
    if not isinstance(rho, int | float) or not math.isfinite(rho):
        return (
            "explainer_unscored",
            f"method=fast: the amortised explainer of {version} carries no quality figures (fitted by an older "
            f"release), so it is not served as an explanation: score it with `{score_command(version, data)}` "
            f"(a few minutes; the running service picks the figures up) or refit it with "
            f"`{fit_command(version, data)}`; meanwhile use method=kernel",
            [{"figure": "median_rho", "value": None, "floor": min_rho, "command": score_command(version, data)}],
        )
    if rho < min_rho:
        ref = quality.get("reference") or {}
        return (
            "explainer_below_floor",
            f"method=fast: the amortised explainer of {version} agrees with KernelSHAP "
            f"({ref.get('runs', 1)} x {ref.get('samples', '?')} samples) at median Spearman rho {rho:.3f} "
            f"on {quality.get('images', '?')} held-out images, below the floor EXPLAIN_FAST_MIN_RHO={min_rho:g}: "
            f"it is not served as an explanation. Refit it with a longer budget: "
            f"`{fit_command(version, data, 30)}` (the running service picks it up), or use method=kernel",
            [{"figure": "median_rho", "value": rho, "floor": min_rho, "command": fit_command(version, data, 30)}],
        )
    return None
