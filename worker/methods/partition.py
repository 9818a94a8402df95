"""``partition``: ``shap.PartitionExplainer`` with ``shap.maskers.Image`` on the 32×32×3 model input.

The masker writes a sentinel into hidden pixels and the wrapped model turns "equals the
sentinel" into keep weights for the shared value function
(:meth:`shapcore.value.CoalitionModel.keep_probabilities`), so a hidden pixel is filled exactly
as for every other method (``train:K`` averages over the K images here too). Deterministic
for given settings (its tree walk included: checked by ``tests/test_explain_methods.py``).
"""

from __future__ import annotations

import numpy as np

from worker.methods.base import Attribution, MethodContext, all_hidden, model_image, per_superpixel, spearman

#: What the Image masker writes into a hidden pixel: outside the model input's [0, 1] range,
#: so a kept pixel can never equal it.
PARTITION_SENTINEL = -1.0
#: The partition explainer is converged when its target-class values at half the budget rank
#: the superpixels like the full budget's (Spearman ρ at least this).
PARTITION_STABLE_RHO = 0.9


def _partition_maps(ctx: MethodContext, max_evals: int) -> tuple[np.ndarray, int]:
    """(C, 32, 32) channel-summed Owen values of every class, and the rows evaluated."""
    import shap

    image = model_image(ctx)[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)  # (32, 32, 3)
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


def attribute(ctx: MethodContext) -> Attribution:
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
    rho = spearman(phi[:, ctx.target], half)
    fx, base = ctx.f.fx(), all_hidden(ctx)
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
