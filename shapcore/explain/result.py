"""What an explanation answers: :class:`ExplainResult`, built by :func:`attribution_fields`.

One shape for every method, queued or inline: the target class first (its values, standard
errors and local-accuracy residual), then every class. ``shap_values[i]`` belongs to player
``i``; the players' map is ``GET /explain/{id}/segments.png`` (a 16-bit greyscale PNG whose
pixel values are the player indices). A method may add fields of its own (Grad-CAM's layer,
integrated gradients' completeness gap): the model allows extra fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class ClassAttribution(ClassScore):
    """One class's values over the players."""

    base_value: float = Field(description="The value with every player hidden.")
    shap_values: list[float] = Field(description="One value per player (player i: segments.png's value i).")
    standard_errors: list[float] | None = Field(description="Per player; None for methods that do not sample.")
    local_accuracy_residual: float | None = Field(description="|base + sum(values) - f(x)|; None if not efficient.")


class PlayerMap(BaseModel):
    """The players (superpixels or grid cells) the values belong to."""

    requested: int
    count: int = Field(description="Players, numbered 0..count-1 in segments.png.")
    height: int = Field(description="Height of the explained picture (and of segments.png).")
    width: int


class ExplainResult(BaseModel):
    """A finished explanation (queued or inline)."""

    model_config = ConfigDict(extra="allow")

    method: str
    players: str
    target: ClassScore
    predicted: ClassScore
    base_value: float
    shap_values: list[float]
    standard_errors: list[float] | None
    convergence: dict[str, Any] | None = Field(description="Whether the estimate converged and by which criterion.")
    local_accuracy_residual: float | None
    max_local_accuracy_residual: float | None
    segments: PlayerMap
    samples: int | None = Field(description="Coalitions evaluated (0 for methods that do not sample).")
    samples_requested: int | str | None = Field(None, description="samples as asked: an integer or auto.")
    samples_raised_to: int | None = None
    stopped: str | None = Field(None, description="Why the sampling stopped: converged (the standard errors met the "
                                "tolerance, or every coalition was evaluated), cap (samples=auto ran out of its cap), "
                                "budget (a fixed budget was spent); None for methods that do not sample.")
    evaluations: int | None = Field(None, description="Coalitions the method evaluated (as samples).")
    background: str
    background_images: int
    seed: int | None = None
    classes: list[ClassAttribution]
    model_evaluations: int
    faithfulness_evaluations: int | None = None
    faithfulness: dict[str, Any] | None = Field(None, description="Deletion and insertion curves and their areas.")
    timings_s: dict[str, float]
    duration_s: float
    evaluations_per_second: float | None = None
    model_version: str | None = None
    device: str | None = None
    precision: str | None = None
    runtime: dict[str, Any] | None = Field(
        None,
        description="The runtime that ran the model's forward passes (EXPLAIN_RUNTIME): its name, precision, "
        "speed-up over fp32 TorchScript and top-1 agreement with it on the version's validation sample "
        "(null figures: named, not measured).",
    )
    parameters: dict[str, Any] | None = None
    job_id: str | None = None


def attribution_fields(
    phi: np.ndarray,
    base: np.ndarray,
    fx: np.ndarray,
    class_names: list[str],
    target: int,
    *,
    efficient: bool,
    stderr: np.ndarray | None = None,
) -> dict[str, Any]:
    """The per-class part of a result, shared by every method: ``phi`` (M, C), ``base`` and
    ``fx`` (C,), ``stderr`` (M, C) or None. Local accuracy (base + Σφ = f(x)) is reported for
    ``efficient`` methods only: a method without that property reports no meaningless gap."""
    predicted = int(np.argmax(fx))
    residuals = np.abs(base + phi.sum(axis=0) - fx) if efficient else None

    def residual(c: int) -> float | None:
        return None if residuals is None else float(residuals[c])

    def errors(c: int) -> list[float] | None:
        return None if stderr is None else [float(v) for v in stderr[:, c]]

    def score(c: int) -> dict[str, Any]:
        return {"index": c, "label": class_names[c], "probability": float(fx[c])}

    classes = [
        {**score(c), "base_value": float(base[c]), "shap_values": [float(v) for v in phi[:, c]],
         "standard_errors": errors(c), "local_accuracy_residual": residual(c)}
        for c in range(len(class_names))
    ]  # fmt: skip
    return {
        "target": score(target),
        "predicted": score(predicted),
        "base_value": float(base[target]),
        "shap_values": [float(v) for v in phi[:, target]],
        "standard_errors": errors(target),
        "local_accuracy_residual": residual(target),
        "max_local_accuracy_residual": None if residuals is None else float(residuals.max()),
        "classes": classes,
    }
