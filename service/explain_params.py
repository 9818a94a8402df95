"""The parameters of ``POST /explain`` as form fields, their bounds taken from the settings.

:func:`bounded` makes the ``Annotated`` type of one integer field: its OpenAPI schema is an
integer with the settings' minimum, maximum and default; its validator accepts plain decimal
digits only (``int()`` alone also takes ``1_000``, ``+5`` and other scripts' digits) and says
the allowed range when refusing. A refusal is a pydantic error, so FastAPI answers it as a
``RequestValidationError`` (422 ``invalid_parameter`` naming the field; :mod:`service.errors`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Form, Request
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from shapcore.errors import InputError
from shapcore.jobs.settings import ExplainSettings

PARAMS = ("target", "segments", "samples", "background", "seed")
#: A decimal integer in ASCII digits.
_INTEGER = re.compile(r"-?[0-9]+")


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= 40 else f"{raw[:40]!r}... ({len(raw)} characters)"


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_parameter", "{message}", {"message": message})


def _integer_checker(name: str, lo: int, hi: int):
    def check(raw: Any) -> int:
        text = str(raw).strip()
        if not _INTEGER.fullmatch(text):
            raise _refuse(f"{name} must be an integer from {lo} to {hi} (got {_shown(str(raw))})")
        if len(text.lstrip("-")) > 30:  # far out of any range (and int() refuses over 4300 digits)
            raise _refuse(f"{name} must be from {lo} to {hi} (got {_shown(str(raw))})")
        value = int(text)
        if not lo <= value <= hi:
            raise _refuse(f"{name} must be from {lo} to {hi} (got {value})")
        return value

    return check


def bounded(name: str, bounds: tuple[int, int], description: str) -> Any:
    """``Annotated[int, ...]`` for the form field ``name``, within ``bounds`` (inclusive)."""
    lo, hi = bounds
    # Form first: its ge/le become the schema's minimum/maximum; the validator runs before them.
    return Annotated[int, Form(ge=lo, le=hi, description=description), BeforeValidator(_integer_checker(name, lo, hi))]


def descriptions(settings: ExplainSettings) -> dict[str, str]:
    limit = settings.explain_max_evaluations
    return {
        "segments": "SLIC superpixels asked for.",
        "samples": f"Coalitions evaluated (KernelSHAP nsamples). samples x background may not exceed {limit}.",
        "background": "Background images standing in for hidden superpixels.",
        "seed": "Seed of the coalition sampling.",
    }


TARGET_DESCRIPTION = "Class label (any case) or index of the served model; default: the top-1 prediction."


def invalid(message: str) -> InputError:
    return InputError(422, "invalid_parameter", message)


def resolve_target(raw: str | None, class_names: list[str]) -> int | None:
    """A class label (any case) or index of ``class_names``; None (blank): the top-1 prediction."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if _INTEGER.fullmatch(text):
        index = int(text) if len(text) <= 30 else -1
        if 0 <= index < len(class_names):
            return index
    else:
        lowered = [c.lower() for c in class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    raise invalid(
        f"unknown target class {_shown(text)}: use a label ({', '.join(class_names)}) "
        f"or an index from 0 to {len(class_names) - 1}"
    )


def check_evaluations(samples: int, background: int, settings: ExplainSettings) -> None:
    evaluations = samples * background
    if evaluations > settings.explain_max_evaluations:
        raise invalid(
            f"samples x background = {samples} x {background} = {evaluations} model evaluations, "
            f"over the limit of {settings.explain_max_evaluations}: lower samples or background"
        )


def form_fields_only(request: Request) -> None:
    """Dependency: the parameters travel as form fields; in the query string they would be ignored, so 422."""
    given = [name for name in PARAMS if name in request.query_params]
    if given:
        raise invalid(
            f"{', '.join(given)} in the query string: send the explanation parameters as multipart form fields "
            f"beside 'file' (curl -F {given[0]}=...)"
        )


def heatmap_classes(raw: str, result: dict[str, Any]) -> tuple[str, list[int]]:
    """``classes`` of the heatmap: (cache variant, class indices)."""
    labels = [c["label"] for c in result["classes"]]
    text = (raw or "target").strip().lower()
    if text == "target":
        return "target", [result["target"]["index"]]
    if text == "all":
        return "all", list(range(len(labels)))
    lowered = [lbl.lower() for lbl in labels]
    picked: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part.isascii() and part.isdigit() and len(part) <= 30 and int(part) < len(labels):
            picked.append(int(part))
        elif part in lowered:
            picked.append(lowered.index(part))
        else:
            raise invalid(
                f"classes must be 'target', 'all' or a comma-separated list of labels ({', '.join(labels)}) "
                f"or indices 0 to {len(labels) - 1} (got {raw!r})"
            )
    picked = list(dict.fromkeys(picked))
    return ",".join(str(i) for i in picked), picked
