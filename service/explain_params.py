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
from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from shapcore.errors import InputError
from shapcore.explain.background import STORED_BACKGROUND, parse_background
from shapcore.explain.layouts import PLAYER_LAYOUTS
from shapcore.explain.methods import METHODS, describe_methods
from shapcore.jobs.settings import ExplainSettings

PARAMS = ("target", "segments", "samples", "background", "seed", "method", "faithfulness", "players")
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


def samples_field(bounds: tuple[int, int], description: str) -> Any:
    """``Annotated[...]`` for ``samples``: ``auto`` (any case) or a decimal integer within ``bounds``."""
    integer = _integer_checker("samples", *bounds)

    def check(raw: Any) -> int | str:
        text = str(raw).strip()
        if text.lower() == "auto":
            return "auto"
        if not _INTEGER.fullmatch(text):
            lo, hi = bounds
            raise _refuse(f"samples must be auto or an integer from {lo} to {hi} (got {_shown(str(raw))})")
        return integer(raw)

    return Annotated[str, Form(description=description, json_schema_extra={"pattern": "^(auto|[0-9]+)$"}),
                     AfterValidator(check)]  # fmt: skip


def descriptions(settings: ExplainSettings) -> dict[str, str]:
    limit = settings.explain_max_evaluations
    return {
        "segments": "Players asked for with players=slic (SLIC superpixels); the grid has 64.",
        "samples": "Coalitions evaluated by the sampled methods: auto (the default: adjusted and leverage sample in "
        "rounds and stop when their standard errors say converged, within "
        f"{settings.explain_auto_cap}; kernel and partition spend {settings.explain_auto_cap}) or an integer budget "
        f"(kernel: KernelSHAP nsamples; partition: max_evals), at least 4 x segments. samples x background images "
        f"may not exceed {limit}.",
        "background": "What fills a hidden player: mean (the mean training image), blur (the image blurred), "
        f"train:K (K of the version's {STORED_BACKGROUND} stored training images, averaged; train:100 is the "
        "study's), kmeans:K (K centroids). Integers are aliases: 1 = mean, 100 = train:100, 2-99 = kmeans:K.",
        "seed": "Seed of the coalition sampling.",
        "method": "All give per-player values. " + describe_methods(),
        "players": "What the values are given to: slic (the image's SLIC superpixels, `segments` of them) or grid "
        "(the 8x8 grid of 4x4-pixel cells at the model's 32 px: 64 players, `segments` ignored), the players of "
        "method=fast, so that a queued method can be compared with it value for value.",
        "faithfulness": "method=fast only: also compute the deletion and insertion curves in the request (about a "
        "hundred model evaluations more); the queued methods always compute them.",
    }


def _canonical_background(raw: str) -> str:
    try:
        return parse_background(raw, STORED_BACKGROUND).name
    except ValueError as exc:
        raise _refuse(str(exc)) from None


def background_field(description: str) -> Any:
    """``Annotated[str, ...]`` for ``background``: a name or an integer alias, answered in its canonical name."""
    return Annotated[str, Form(description=description), AfterValidator(_canonical_background)]


def flag_field(name: str, description: str) -> Any:
    """``Annotated[...]`` for a yes/no form field: exactly ``true`` or ``false`` (any case), read as a bool.

    Not FastAPI's lax bool (which also takes 1/0, yes/no, on/off): the schema says a two-value
    enum, and the route accepts what the schema says, no more."""

    def check(raw: str) -> bool:
        text = raw.strip().lower()
        if text not in ("true", "false"):
            raise _refuse(f"{name} must be true or false (got {_shown(raw)})")
        return text == "true"

    return Annotated[str, Form(description=description, json_schema_extra={"enum": ["true", "false"]}),
                     AfterValidator(check)]  # fmt: skip


def choice_field(name: str, choices: tuple[str, ...], description: str) -> Any:
    """``Annotated[str, ...]`` for a form field taking one of ``choices`` (any case), answered in lower case."""

    def check(raw: str) -> str:
        text = raw.strip().lower()
        if text not in choices:
            raise _refuse(f"{name} must be one of {', '.join(choices)} (got {_shown(raw)})")
        return text

    return Annotated[str, Form(description=description, json_schema_extra={"enum": list(choices)}),
                     AfterValidator(check)]  # fmt: skip


def players_field(description: str) -> Any:
    return choice_field("players", PLAYER_LAYOUTS, description)


def method_field(description: str) -> Any:
    return choice_field("method", tuple(METHODS), description)


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
