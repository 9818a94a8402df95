"""The explanation methods, each declared once with its properties.

A method is one :class:`Method` entry in :data:`METHODS` plus the module its ``entry`` names.
The API builds its ``method`` field and its OpenAPI text from this table, the request checks
its rules here (:mod:`.request`), the worker imports the entry point of a queued method by
name (:func:`worker.methods.run_method`), and the result says which properties hold
(local accuracy is checked only for ``efficient`` methods).

To add a method: a module in ``worker/methods/`` with ``attribute(ctx) -> Attribution``
(:mod:`worker.methods.base`) and an entry here; bump :data:`EXPLAINER_REVISION` when an
existing method's results change.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bumped whenever the worker's results change for the same request (part of the dedupe key).
EXPLAINER_REVISION = 4


@dataclass(frozen=True)
class Method:
    """One explanation method and what holds for it.

    ``sampled``: its cost and accuracy follow ``samples`` (the floor of 4 x players applies);
    ``gradients``: it needs an autograd copy of the model (not the frozen TorchScript one);
    ``efficient``: its values add up to f(x) - base (local accuracy is reported);
    ``inline``: answered by the API in the request, never queued;
    ``entry``: ``module:function`` computing it (a queued method: ``attribute(ctx) -> Attribution``);
    ``players``/``background``: the layout and background it is bound to (None: any).
    """

    name: str
    title: str
    description: str
    entry: str
    sampled: bool = False
    gradients: bool = False
    efficient: bool = True
    inline: bool = False
    players: str | None = None
    background: str | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("kernel", "KernelSHAP", "KernelSHAP (shap.KernelExplainer) over the players (the default until "
               "issue 26; samples=auto spends the cap)",
               "worker.methods.kernel:attribute", sampled=True),
        Method("leverage", "Leverage SHAP",
               "Leverage SHAP (Musco & Witter 2025) over the players, sampled in rounds until its standard errors "
               "say it converged; samples is its cap", "worker.methods.leverage:attribute", sampled=True),
        Method("adjusted", "Regression-adjusted SHAP",
               "regression-adjusted Shapley values (Witter, Liu & Musco 2025: a surrogate's exact values plus Leverage "
               "SHAP on its residuals) over the players, the default; samples=auto stops when its standard errors say "
               "converged",
               "worker.methods.adjusted:attribute", sampled=True),
        Method("partition", "Partition SHAP", "shap's PartitionExplainer over the pixels, summed per player",
               "worker.methods.partition:attribute", sampled=True),
        Method("gradcam", "Grad-CAM", "Captum's LayerGradCam, summed per player (not efficient)",
               "worker.methods.gradcam:attribute", gradients=True, efficient=False),
        Method("integrated_gradients", "Integrated gradients",
               "Captum's IntegratedGradients from the background to the image, summed per player",
               "worker.methods.integrated_gradients:attribute", gradients=True),
        Method("fast", "Amortised SHAP (FastSHAP)",
               "the version's amortised explainer, answered in the request (200 with the result) over the 8x8 "
               "grid's cells with the mean background; 409 when the version has none",
               "service.fast_explain:explain_fast", inline=True, players="grid", background="mean"),
    )
}  # fmt: skip
DEFAULT_METHOD = "adjusted"
#: The methods a worker runs (queued) and the ones the API answers itself.
QUEUED_METHODS = tuple(name for name, m in METHODS.items() if not m.inline)
INLINE_METHODS = tuple(name for name, m in METHODS.items() if m.inline)


def get_method(name: str) -> Method:
    """The method ``name``; ValueError naming the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {name[:40]!r})") from None


def describe_methods() -> str:
    """The ``method`` field's OpenAPI text, from the table."""
    return "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + "."
