"""The deletion and insertion curves of a finished explanation, as a PNG.

Two panels side by side, drawn from the result alone (``result["faithfulness"]``, see
:mod:`shapcore.faithfulness`): deletion (the target's probability as the superpixels are hidden
in the explanation's order; lower is better) and insertion (restored in that order; higher is
better). Each shows the explanation's curve and the random-order baseline (dashed), their
AUCs in the legend, and the area between them shaded: green where the explanation beats
random, red where it does worse. The title names the method and the target class.

Matplotlib's object API (no pyplot state) keeps rendering safe in the API's worker threads.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

DPI = 100
#: Figure size in inches: two panels of 480 × 420 px or so, with the title above.
FIGSIZE = (10.0, 4.6)
METHOD_COLOUR = "#1f77b4"
RANDOM_COLOUR = "#7f7f7f"


def _panel(ax: Any, fraction: np.ndarray, curve: np.ndarray, baseline: np.ndarray, *, kind: str,
           auc: float, random_auc: float) -> None:  # fmt: skip
    better = curve < baseline if kind == "deletion" else curve > baseline
    ax.fill_between(fraction, curve, baseline, where=better, interpolate=True, color="#2ca02c", alpha=0.15, lw=0)
    ax.fill_between(fraction, curve, baseline, where=~better, interpolate=True, color="#d62728", alpha=0.15, lw=0)
    ax.plot(fraction, curve, color=METHOD_COLOUR, lw=2, marker="o", ms=3, label=f"explanation (AUC {auc:.3f})")
    ax.plot(fraction, baseline, color=RANDOM_COLOUR, lw=1.5, ls="--", label=f"random order (AUC {random_auc:.3f})")
    verb, better_word = ("hidden", "lower") if kind == "deletion" else ("restored", "higher")
    ax.set_title(f"{kind.capitalize()}: {better_word} AUC is better", fontsize=11)
    ax.set_xlabel(f"fraction of superpixels {verb}")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right" if kind == "deletion" else "lower right", fontsize=9)


def render_faithfulness(result: dict[str, Any]) -> bytes:
    """PNG bytes of the curves in ``result["faithfulness"]`` (KeyError when the result has none)."""
    fig = faithfulness_figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def faithfulness_figure(result: dict[str, Any]) -> Any:
    """The matplotlib ``Figure``: axes 0 deletion, 1 insertion; in each, line 0 is the
    explanation's curve and line 1 the random baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    faith = result["faithfulness"]
    curves = {name: np.asarray(values, dtype=np.float64) for name, values in faith["curves"].items()}
    target = result["target"]
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        _panel(ax, curves["fraction"], curves[kind], curves[f"random_{kind}"], kind=kind,
               auc=faith[f"{kind}_auc"], random_auc=faith[f"random_{kind}_auc"])  # fmt: skip
    axes[0].set_ylabel(f"p({target['label']})")
    fig.suptitle(
        f"{result.get('method', 'kernel')}: {target['label']} (p={target['probability']:.2f}); "
        f"{faith['steps']} steps, random = mean of {faith['random_orders']} orders",
        fontsize=12,
    )
    fig.tight_layout()
    return fig
