"""``integrated_gradients``: Captum's ``IntegratedGradients`` from the background to the image.

The per-baseline attributions are averaged with the background's weights; the completeness
gap (Captum's convergence delta) decides whether it converged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.methods.base import (
    Attribution,
    MethodContext,
    all_hidden,
    model_image,
    per_superpixel,
    probabilities_of,
    require_autograd,
)

#: Integration steps per baseline (Captum's Gauss-Legendre rule). Cost: classes × steps ×
#: baselines forward and backward passes (500 per fill image for CIFAR-10).
IG_STEPS = 50
#: Images per forward/backward batch inside Captum (bounds the memory of the gradient methods).
IG_BATCH = 128
#: Integrated gradients is converged when, for every class, the completeness gap
#: (Captum's convergence delta, |Σ attributions − (f(x) − f(baseline))|, averaged over the fill
#: images with their weights) is at most this share of |f(x) − base| plus :data:`IG_DELTA_FLOOR`.
IG_DELTA_SHARE = 0.05
IG_DELTA_FLOOR = 0.005


def attribute(ctx: MethodContext) -> Attribution:
    """Captum's ``IntegratedGradients`` of every class's probability, from each fill image.

    One run per fill image (``ctx.f.bg``), :data:`IG_STEPS` steps, averaged with the fill's
    weights: the completeness sum is then f(x) minus the weighted mean of f(fill), which is
    ``base`` (the fill's own value). Channels are summed into a pixel map.
    """
    from captum.attr import IntegratedGradients

    model = require_autograd(ctx, "integrated_gradients")
    x = model_image(ctx)
    classes = ctx.f.classes
    inputs = x.expand(classes, -1, -1, -1).contiguous()
    ig = IntegratedGradients(probabilities_of(model))
    weights = ctx.f.bg_weights.double().cpu().numpy()
    total = np.zeros((classes, *x.shape[-2:]), dtype=np.float64)
    gap = np.zeros(classes, dtype=np.float64)
    for b, w in enumerate(weights):
        baseline = ctx.f.bg[0, b : b + 1].expand(classes, -1, -1, -1).contiguous()
        attr, delta = ig.attribute(inputs, baselines=baseline, target=list(range(classes)), n_steps=IG_STEPS,
                                   internal_batch_size=IG_BATCH, return_convergence_delta=True)
        total += w * attr.detach().double().sum(dim=1).cpu().numpy()
        gap += w * np.abs(delta.detach().double().cpu().numpy())
    fx, base = ctx.f.fx(), all_hidden(ctx)
    return Attribution(
        phi=per_superpixel(total, ctx.f.A.cpu().numpy()),
        base=base,
        fx=fx,
        convergence=_ig_convergence(gap, fx, base, ctx.target),
        pixel_maps=total.astype(np.float32),
        coalitions=0,
        extra={"ig_steps": IG_STEPS, "gradient_evaluations": IG_STEPS * len(weights) * classes},
    )


def _ig_convergence(gap: np.ndarray, fx: np.ndarray, base: np.ndarray, target: int) -> dict[str, Any]:
    bound = IG_DELTA_SHARE * np.abs(fx - base) + IG_DELTA_FLOOR
    return {
        "converged": bool(np.all(gap <= bound)),
        "criterion": (
            f"every class: |completeness gap| <= {IG_DELTA_SHARE:g} * |f(x) - base| + {IG_DELTA_FLOOR:g} "
            f"(Captum's convergence delta, weighted over the fill images; {IG_STEPS} steps)"
        ),
        "delta_target": float(gap[target]),
        "delta_max": float(gap.max()),
    }
