"""The partition explainer, Grad-CAM and integrated gradients (placeholder until the methods work lands)."""

from __future__ import annotations

from worker.methods import Attribution, MethodContext


def partition_attribution(ctx: MethodContext) -> Attribution:
    raise NotImplementedError


def gradcam_attribution(ctx: MethodContext) -> Attribution:
    raise NotImplementedError


def integrated_gradients_attribution(ctx: MethodContext) -> Attribution:
    raise NotImplementedError
