"""The partition explainer, Grad-CAM and integrated gradients, in the common :class:`Attribution` shape.

All three explain the model's class *probabilities* (the softmax of the logits), as KernelSHAP
does, for every class at once, and return a pixel map per class (drawn in the heatmap) summed
over each superpixel's area weights (the per-superpixel values every method reports).

- ``partition``: ``shap.PartitionExplainer`` with ``shap.maskers.Image`` on the 32×32×3 model
  input. The masker writes a sentinel into hidden pixels and the wrapped model turns "equals
  the sentinel" into keep weights for the shared value function
  (:meth:`shapcore.value.CoalitionModel.keep_probabilities`), so a hidden pixel is filled exactly
  as for every other method (``train:K`` averages over the K images here too).
- ``gradcam``: Captum's ``LayerGradCam`` on the last ResNet stage whose output is still at least
  :data:`GRADCAM_MIN_SIDE` pixels on a side at the model's input size (see :func:`gradcam_layer`).
- ``integrated_gradients``: Captum's ``IntegratedGradients`` from each fill image to the image,
  the per-baseline attributions averaged with the fill's weights.

None of them samples, so ``stderr`` is None: they are deterministic for given settings (the
partition explainer's tree walk included: checked by ``tests/test_explain_methods.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.methods import Attribution, MethodContext, per_superpixel

#: What the Image masker writes into a hidden pixel: outside the model input's [0, 1] range,
#: so a kept pixel can never equal it.
PARTITION_SENTINEL = -1.0
#: The partition explainer is converged when its target-class values at half the budget rank
#: the superpixels like the full budget's (Spearman ρ at least this).
PARTITION_STABLE_RHO = 0.9
#: Grad-CAM needs a spatial map: the last stage with an output at least this many pixels a side.
GRADCAM_MIN_SIDE = 4
GRADCAM_CANDIDATES = ("layer4", "layer3", "layer2", "layer1")
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


def _all_hidden(ctx: MethodContext) -> np.ndarray:
    """``base``: the value with every pixel hidden (the fill alone, background-weighted)."""
    pixels = int(ctx.f.A.shape[1])
    return ctx.f.keep_probabilities(np.zeros((1, pixels), dtype=np.float32))[0]


def _image(ctx: MethodContext) -> torch.Tensor:
    """The model input as a float (1, 3, 32, 32) batch in [0, 1]."""
    return ctx.f.x[0].detach().clone()


def _require_autograd(ctx: MethodContext, method: str) -> torch.nn.Module:
    if ctx.autograd_model is None:
        raise ValueError(
            f"method {method!r} needs the model with autograd (worker.runtime.prepare_model's eager network); "
            "the frozen TorchScript model has no gradients"
        )
    return ctx.autograd_model.eval()


def _probabilities(model: torch.nn.Module):
    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(images).float(), dim=-1)

    return forward


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _partition_maps(ctx: MethodContext, max_evals: int) -> tuple[np.ndarray, int]:
    """(C, 32, 32) channel-summed Owen values of every class, and the rows evaluated."""
    import shap

    image = _image(ctx)[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)  # (32, 32, 3)
    rows = [0]

    def model(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch).reshape(-1, *image.shape)
        # A pixel's keep weight: the share of its channels not hidden. The masker's tree splits
        # channels only below single pixels, so this is 0 or 1 but for the deepest splits.
        keep = (batch != PARTITION_SENTINEL).mean(axis=-1).reshape(len(batch), -1)
        rows[0] += len(batch)
        return ctx.f.keep_probabilities(keep.astype(np.float32))

    masker = shap.maskers.Image(PARTITION_SENTINEL, image.shape)
    explainer = shap.PartitionExplainer(model, masker)
    explanation = explainer(image[None], max_evals=int(max_evals), batch_size=64, silent=True)
    values = np.asarray(explanation.values, dtype=np.float64)[0]  # (32, 32, 3, C)
    return np.moveaxis(values.sum(axis=2), -1, 0), rows[0]


def partition_attribution(ctx: MethodContext) -> Attribution:
    """``shap.PartitionExplainer`` (Owen values over the Image masker's pixel tree), every class.

    Convergence: the explainer is run again at half the budget; converged when the target
    class's per-superpixel values rank the superpixels alike (Spearman ρ ≥
    :data:`PARTITION_STABLE_RHO`). This costs half a run more.
    """
    maps, rows = _partition_maps(ctx, ctx.samples)
    half_maps, half_rows = _partition_maps(ctx, max(2, ctx.samples // 2))
    weights = ctx.f.A.cpu().numpy()
    phi = per_superpixel(maps, weights)
    half = per_superpixel(half_maps, weights)[:, ctx.target]
    rho = _spearman(phi[:, ctx.target], half)
    fx, base = ctx.f.fx(), _all_hidden(ctx)
    change = float(np.abs(phi[:, ctx.target] - half).sum() / max(abs(fx[ctx.target] - base[ctx.target]), 1e-12))
    return Attribution(
        phi=phi,
        base=base,
        fx=fx,
        convergence={
            "converged": bool(rho >= PARTITION_STABLE_RHO),
            "criterion": f"target's superpixel ranking at half the budget: Spearman rho >= {PARTITION_STABLE_RHO}",
            "half_budget_spearman": rho,
            "half_budget_relative_l1_change": change,
            "half_budget_evaluations": half_rows,
        },
        pixel_maps=maps.astype(np.float32),
        coalitions=rows,
    )


def gradcam_layer(model: torch.nn.Module, side: int) -> tuple[str, int]:
    """(name, output side) of the last ResNet stage whose output is at least :data:`GRADCAM_MIN_SIDE` a side.

    Probed with one forward pass at the model's input size: the ``cpu`` profile's network
    sees 32 px, its layer4 output is 1×1 (a constant map) and layer2's 4×4 is the last usable
    one; the ``paper`` network upsamples to 224 inside and its layer4 is 7×7. With none large
    enough, the largest output.
    """
    net = getattr(model, "net", model)
    names = [n for n in GRADCAM_CANDIDATES if hasattr(net, n)]
    sizes: dict[str, int] = {}
    hooks = [
        getattr(net, n).register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, min(out.shape[-2:])))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    usable = [n for n in names if sizes.get(n, 0) >= GRADCAM_MIN_SIDE]
    name = usable[0] if usable else max(names, key=lambda n: sizes.get(n, 0))
    return name, int(sizes[name])


def gradcam_attribution(ctx: MethodContext) -> Attribution:
    """Captum's ``LayerGradCam`` for every class's probability, upsampled to 32×32 (bilinear).

    The sign is kept (``relu_attributions=False``): positive = the stage's features push the
    class's probability up (red in the heatmap), negative = down (blue). The usual ReLU would
    hide the evidence against a class, which the per-superpixel values and the deletion curve
    use. No completeness property, so no convergence to check: ``converged`` is None.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    model = _require_autograd(ctx, "gradcam")
    x = _image(ctx)
    side = int(x.shape[-1])
    name, layer_side = gradcam_layer(model, side)
    layer = getattr(getattr(model, "net", model), name)
    classes = ctx.f.classes
    cam = LayerGradCam(_probabilities(model), layer)
    attr = cam.attribute(x.expand(classes, -1, -1, -1).contiguous(), target=list(range(classes)),
                         relu_attributions=False)
    maps = LayerAttribution.interpolate(attr.detach(), (side, side), interpolate_mode="bilinear")
    maps = maps[:, 0].double().cpu().numpy()  # (C, 32, 32)
    return Attribution(
        phi=per_superpixel(maps, ctx.f.A.cpu().numpy()),
        base=_all_hidden(ctx),
        fx=ctx.f.fx(),
        # nothing sampled, nothing approximated: one gradient computes Grad-CAM exactly as defined
        convergence={"converged": True, "criterion": "deterministic: one gradient, nothing sampled"},
        pixel_maps=maps.astype(np.float32),
        coalitions=0,
        extra={"gradcam_layer": name, "gradcam_layer_side": layer_side, "gradient_evaluations": classes},
    )


def integrated_gradients_attribution(ctx: MethodContext) -> Attribution:
    """Captum's ``IntegratedGradients`` of every class's probability, from each fill image.

    One run per fill image (``ctx.f.bg``), :data:`IG_STEPS` steps, averaged with the fill's
    weights: the completeness sum is then f(x) minus the weighted mean of f(fill), which is
    ``base`` (the fill's own value). Channels are summed into a pixel map.
    """
    from captum.attr import IntegratedGradients

    model = _require_autograd(ctx, "integrated_gradients")
    x = _image(ctx)
    classes = ctx.f.classes
    inputs = x.expand(classes, -1, -1, -1).contiguous()
    ig = IntegratedGradients(_probabilities(model))
    weights = ctx.f.bg_weights.double().cpu().numpy()
    total = np.zeros((classes, *x.shape[-2:]), dtype=np.float64)
    gap = np.zeros(classes, dtype=np.float64)
    for b, w in enumerate(weights):
        baseline = ctx.f.bg[0, b : b + 1].expand(classes, -1, -1, -1).contiguous()
        attr, delta = ig.attribute(inputs, baselines=baseline, target=list(range(classes)), n_steps=IG_STEPS,
                                   internal_batch_size=IG_BATCH, return_convergence_delta=True)
        total += w * attr.detach().double().sum(dim=1).cpu().numpy()
        gap += w * np.abs(delta.detach().double().cpu().numpy())
    fx, base = ctx.f.fx(), _all_hidden(ctx)
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
