"""The explanation heatmap, drawn as the study shows it (after ``shap.image_plot``).

One row: the input image in colour, then one panel per explained class showing the image
in grey (``alpha=0.15``, as shap does) under the superpixel SHAP values in shap's
red-transparent-blue map (red: pushes towards the class, blue: away from it), one colour
scale symmetric around zero shared by every panel, a horizontal colour bar labelled
"SHAP value", and "label (p=0.87)" as each panel's title.

Each panel is at least :data:`MIN_PANEL_PX` pixels wide: a 32x32 upload is drawn with
nearest-neighbour upscaling, so superpixel boundaries stay crisp. Matplotlib's object API
(no pyplot state) keeps rendering safe in the API's worker threads.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

MIN_PANEL_PX = 256
DPI = 100
#: Panel width in inches: 300 px at DPI 100, over MIN_PANEL_PX.
PANEL_IN = 3.0
#: The layout in inches: side margins, the gap between panels, room for titles above and the colour bar below.
MARGIN_IN, GAP_IN, TOP_IN, BOTTOM_IN = 0.1, 0.15, 0.45, 0.95


def panel_box(index: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) in PNG pixels of panel ``index`` (0: the input, 1..: the classes)
    of a heatmap of an ``height`` x ``width`` picture: where a client finds a class's map."""
    panel_w, panel_h = PANEL_IN, PANEL_IN * height / width
    left = MARGIN_IN + index * (panel_w + GAP_IN)
    return round(left * DPI), round(TOP_IN * DPI), round(panel_w * DPI), round(panel_h * DPI)


def _cmap():
    try:
        from shap.plots.colors import red_transparent_blue

        return red_transparent_blue
    except Exception:  # shap's colormap module moved: build the same map
        from matplotlib.colors import LinearSegmentedColormap

        colors = []
        for alpha in np.linspace(1, 0, 100):
            colors.append((30 / 255, 136 / 255, 229 / 255, alpha))
        for alpha in np.linspace(0, 1, 100):
            colors.append((255 / 255, 13 / 255, 87 / 255, alpha))
        return LinearSegmentedColormap.from_list("red_transparent_blue", colors)


def resample_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D map enlarged or reduced to ``height`` x ``width`` by nearest neighbour (each cell
    spread over the part of the picture it stands for)."""
    rows = (np.arange(height) * values.shape[0]) // height
    cols = (np.arange(width) * values.shape[1]) // width
    return values[rows][:, cols]


def render_heatmap(
    image: np.ndarray,
    labels: np.ndarray,
    result: dict[str, Any],
    classes: list[int],
    pixel_maps: np.ndarray | None = None,
) -> bytes:
    """PNG bytes. ``image``: the segmented RGB pixels (H×W×3 uint8); ``labels``: H×W superpixel ids;
    ``pixel_maps``: (classes, h, w) attributions of a pixel method, drawn instead of the
    superpixel values (each cell spread over the part of the image it stands for)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_index = {c["index"]: c for c in result["classes"]}
    if pixel_maps is not None:
        maps = [resample_nearest(pixel_maps[c].astype(np.float64), *labels.shape) for c in classes]
    else:
        maps = [np.asarray(by_index[c]["shap_values"], dtype=np.float64)[labels] for c in classes]
    # shap.image_plot: the 99.9th percentile of |values| over every panel, symmetric scale.
    max_val = float(np.nanpercentile(np.abs(np.stack(maps)), 99.9)) if maps else 0.0
    if not np.isfinite(max_val) or max_val <= 0:
        max_val = 1e-12

    height, width = labels.shape
    n = len(classes) + 1
    # Laid out in inches: panels PANEL_IN wide side by side, room for titles above and the
    # colour bar below.
    panel_w, panel_h = PANEL_IN, PANEL_IN * height / width
    margin, gap, top, bottom = MARGIN_IN, GAP_IN, TOP_IN, BOTTOM_IN
    fig_w = 2 * margin + n * panel_w + (n - 1) * gap
    fig_h = top + panel_h + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [
        fig.add_axes(((margin + i * (panel_w + gap)) / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
        for i in range(n)
    ]

    grey = 0.2989 * image[..., 0] + 0.5870 * image[..., 1] + 0.1140 * image[..., 2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    predicted = result["predicted"]
    axes[0].imshow(image, interpolation="nearest", extent=extent)
    axes[0].set_title(f"input: {predicted['label']} (p={predicted['probability']:.2f})", fontsize=10)
    axes[0].axis("off")
    cmap = _cmap()
    im = None
    for ax, c, sv in zip(axes[1:], classes, maps, strict=True):
        entry = by_index[c]
        ax.imshow(grey, cmap="gray", alpha=0.15, interpolation="nearest", extent=extent)
        im = ax.imshow(sv, cmap=cmap, vmin=-max_val, vmax=max_val, interpolation="nearest", extent=extent)
        marker = " *" if c == result["target"]["index"] and len(classes) > 1 else ""
        ax.set_title(f"{entry['label']} (p={entry['probability']:.2f}){marker}", fontsize=10)
        ax.axis("off")
    if im is not None:
        bar_w = min(fig_w - 2 * margin, max(2 * panel_w, fig_w * 0.4))
        cax = fig.add_axes(((fig_w - bar_w) / 2 / fig_w, 0.45 / fig_h, bar_w / fig_w, 0.12 / fig_h))
        label = "SHAP value" if result.get("method", "kernel") in ("kernel", "partition") else "attribution"
        cb = fig.colorbar(im, cax=cax, orientation="horizontal", label=label)
        cb.outline.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
