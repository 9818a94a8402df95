"""The study's report of one version: ``python -m training report --version V --data SRC``.

One self-contained HTML file (every figure a ``data:`` URI, no script, no external URL) with
what the study showed for its model: Tables 4 and 5, the confusion matrix, the training
curves, examples per class, the most confused pairs and the most confident mistakes with
their SHAP heatmaps for the true and the predicted class side by side, and per class where
the attributions fall. The explanations are the workers' (:mod:`training.explain_jobs`),
drawn by the API's heatmap renderer (:mod:`shapcore.heatmap`).

Written by default into the version's folder (``report.html``), where ``GET /model/report``
serves the served version's.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shapcore.explain.request import ExplainRequest
from shapcore.heatmap import render_heatmap, resample_nearest
from shapcore.jobs.settings import ExplainSettings
from shapcore.registry import REPORT_HTML, Registry
from shapcore.store import write_file_atomic
from training import plots
from training.evaluate import compute_metrics, load_eval_images, predict_probabilities
from training.explain_jobs import Explained, explain_images, report_request

#: Images per class in the examples grid.
EXAMPLES_PER_CLASS = 8
#: Most confused class pairs shown, and most confident mistakes.
CONFUSED_PAIRS = 3
CONFIDENT_MISTAKES = 6
#: The study's published figures (Tables 4 and 5), shown beside the version's.
STUDY = {
    "accuracy": 0.8135,
    "precision": 0.815,
    "recall": 0.814,
    "f1": 0.813,
    "per_class_f1": {"cat": 0.66, "dog": 0.68},
}
#: The side of the square the attribution maps are averaged on, and its central part.
MAP_SIDE = 32


@dataclass(frozen=True)
class Case:
    """One image of the data the report shows: its index, true and predicted class and probability."""

    index: int
    true: int
    predicted: int
    probability: float


@dataclass
class Selection:
    """The images the report explains, by section."""

    per_class: dict[int, list[int]] = field(default_factory=dict)
    pairs: list[tuple[int, int, list[Case]]] = field(default_factory=list)
    mistakes: list[Case] = field(default_factory=list)

    def indices(self) -> list[int]:
        """Every image to explain, each once, in a stable order."""
        seen: dict[int, None] = {}
        for ids in self.per_class.values():
            seen.update(dict.fromkeys(ids))
        for _, _, cases in self.pairs:
            seen.update(dict.fromkeys(c.index for c in cases))
        seen.update(dict.fromkeys(c.index for c in self.mistakes))
        return list(seen)


def confused_pairs(cm: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """The ``k`` class pairs (a, b), a < b, most often mistaken for each other either way, with the count."""
    n = cm.shape[0]
    pairs = [(a, b, int(cm[a, b] + cm[b, a])) for a in range(n) for b in range(a + 1, n)]
    pairs = [p for p in pairs if p[2] > 0]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:k]


def most_confident(probs: np.ndarray, y: np.ndarray, mask: np.ndarray, k: int) -> list[Case]:
    """The ``k`` images under ``mask`` whose top-1 probability is highest."""
    predicted = probs.argmax(1)
    top = probs.max(1)
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(-top[idx], kind="stable")][:k]
    return [Case(int(i), int(y[i]), int(predicted[i]), float(top[i])) for i in idx]


def select(probs: np.ndarray, y: np.ndarray, cm: np.ndarray, per_class: int) -> Selection:
    """What to show (and explain): the first ``per_class`` images of each class, the most
    confident mistake each way of the most confused pairs, the most confident mistakes overall."""
    sel = Selection()
    predicted = probs.argmax(1)
    for c in range(cm.shape[0]):
        if per_class > 0:
            sel.per_class[c] = [int(i) for i in np.flatnonzero(y == c)[:per_class]]
    for a, b, _ in confused_pairs(cm, CONFUSED_PAIRS):
        cases = most_confident(probs, y, (y == a) & (predicted == b), 1)
        cases += most_confident(probs, y, (y == b) & (predicted == a), 1)
        sel.pairs.append((a, b, cases))
    sel.mistakes = most_confident(probs, y, predicted != y, CONFIDENT_MISTAKES)
    return sel


def attribution_location(explained: Sequence[Explained], cls: int) -> np.ndarray:
    """The mean over ``explained`` of class ``cls``'s positive attribution per pixel, each map
    scaled to sum to 1 (on a MAP_SIDE x MAP_SIDE grid): where the evidence for the class lies."""
    total = np.zeros((MAP_SIDE, MAP_SIDE))
    used = 0
    for e in explained:
        values = e.attribution_map(cls)
        positive = np.clip(resample_nearest(values, MAP_SIDE, MAP_SIDE), 0, None)
        if positive.sum() > 0:
            total += positive / positive.sum()
            used += 1
    return total / used if used else total


def centre_share(location: np.ndarray) -> float:
    """The part of ``location``'s mass in the central half of each side (a quarter of the area):
    0.25 when attributions fall anywhere alike, towards 1 on a centred object."""
    h, w = location.shape
    mass = location.sum()
    return float(location[h // 4 : h - h // 4, w // 4 : w - w // 4].sum() / mass) if mass > 0 else float("nan")


# -- figures -------------------------------------------------------------------------------------


def a_or_an(noun: str) -> str:
    """'an airplane', 'a cat'."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def examples_png(images: np.ndarray, cases: dict[int, list[Case]], class_names: list[str]) -> bytes:
    """A grid: one row per class, its first images titled with the prediction (green right, red wrong)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max((len(v) for v in cases.values()), default=1)
    fig = Figure(figsize=(1.1 * cols + 1.2, 1.25 * len(class_names)), dpi=90)
    FigureCanvasAgg(fig)
    for r, name in enumerate(class_names):
        for col in range(cols):
            ax = fig.add_subplot(len(class_names), cols, r * cols + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
            row = cases.get(r, [])
            if col >= len(row):
                ax.axis("off")
                continue
            case = row[col]
            ax.imshow(images[case.index].transpose(1, 2, 0), interpolation="nearest")
            right = case.predicted == case.true
            ax.set_title(f"{class_names[case.predicted]} {case.probability:.2f}", fontsize=7,
                         color="#1a7f37" if right else "#cf222e")  # fmt: skip
            for spine in ax.spines.values():
                spine.set_visible(False)
    fig.tight_layout(pad=0.4)
    return _png(fig)


def location_png(maps: dict[int, np.ndarray], class_names: list[str]) -> bytes:
    """One panel per class: the mean positive attribution of :func:`attribution_location`, one scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = sorted(maps)
    cols = min(5, len(classes))
    rows = -(-len(classes) // cols)
    vmax = max((float(m.max()) for m in maps.values()), default=1.0) or 1.0
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows + 0.6), dpi=90)
    FigureCanvasAgg(fig)
    im = None
    for k, c in enumerate(classes):
        ax = fig.add_subplot(rows, cols, k + 1)
        im = ax.imshow(maps[c], cmap="Reds", vmin=0, vmax=vmax, interpolation="nearest")
        rect = (MAP_SIDE // 4 - 0.5, MAP_SIDE // 4 - 0.5)
        ax.add_patch(_rectangle(rect, MAP_SIDE // 2))
        ax.set_title(f"{class_names[c]}: centre {100 * centre_share(maps[c]):.0f}%", fontsize=9)
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=fig.axes, orientation="horizontal", fraction=0.04, pad=0.04,
                     label="mean share of the positive attribution per pixel")  # fmt: skip
    return _png(fig)


def _upscaled_png(image: np.ndarray, scale: int = 4) -> bytes:
    """A CHW uint8 image as a PNG, enlarged with crisp pixels."""
    from PIL import Image

    pic = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
    pic = pic.resize((pic.width * scale, pic.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def _rectangle(corner: tuple[float, float], side: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(corner, side, side, fill=False, edgecolor="#444", linestyle="--", linewidth=0.8)


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Scored:
    """A version's predictions on the report's images."""

    names: list[str]
    images: np.ndarray  # uint8 N x 3 x 32 x 32
    y: np.ndarray
    probs: np.ndarray
    metrics: dict[str, Any]

    def case(self, i: int) -> Case:
        return Case(i, int(self.y[i]), int(self.probs[i].argmax()), float(self.probs[i].max()))


def shown_image(scored: Scored, i: int, e: Explained | None) -> dict[str, Any]:
    """Image ``i`` for the page: its heatmap for its true class and, when the prediction differs,
    the predicted one side by side; the picture alone when it was not explained."""
    c, names = scored.case(i), scored.names
    classes = [c.true] if c.predicted == c.true else [c.true, c.predicted]
    what = f"{a_or_an(names[c.true])} image predicted {names[c.predicted]} (p={c.probability:.2f})"
    if e is None:
        png, alt = _upscaled_png(scored.images[i]), what
    else:
        png = render_heatmap(e.image, e.labels, e.result, classes, e.pixel_maps)
        alt = f"SHAP heatmap of {what}, for the classes {', '.join(names[k] for k in classes)}"
    return {
        "explained": e is not None,
        "uri": data_uri(png),
        "true": names[c.true],
        "predicted": names[c.predicted],
        "probability": c.probability,
        "right": c.predicted == c.true,
        "alt": alt,
    }


def _figures(scored: Scored, history: list[dict[str, Any]], version: str, split: str) -> dict[str, str | None]:
    names = scored.names
    buf = io.BytesIO()
    plots.confusion_matrix_png(scored.metrics["confusion_matrix"], names, buf, title=f"{version} on {split}")
    figures: dict[str, str | None] = {"confusion": data_uri(buf.getvalue()), "curves": None}
    if history:
        buf = io.BytesIO()
        plots.training_curves_png(history, buf, title=version)
        figures["curves"] = data_uri(buf.getvalue())
    examples = {c: [scored.case(int(i)) for i in np.flatnonzero(scored.y == c)[:EXAMPLES_PER_CLASS]]
                for c in range(len(names))}  # fmt: skip
    figures["examples"] = data_uri(examples_png(scored.images, examples, names))
    return figures


def _sections(scored: Scored, sel: Selection, explained: dict[int, Explained]) -> dict[str, Any]:
    """The explained parts of the report: per class, confused pairs, mistakes, location."""
    names, cm = scored.names, np.asarray(scored.metrics["confusion_matrix"])

    def shown(i: int) -> dict[str, Any]:
        return shown_image(scored, i, explained.get(i))

    location = {c: attribution_location([explained[i] for i in ids], c) for c, ids in sel.per_class.items() if ids}
    return {
        "per_class": [{"name": names[c], "heatmap": shown(ids[0])} for c, ids in sel.per_class.items() if ids],
        "pairs": [
            {
                "a": names[a],
                "b": names[b],
                "count": int(cm[a, b] + cm[b, a]),
                "a_as_b": int(cm[a, b]),
                "b_as_a": int(cm[b, a]),
                "heatmaps": [shown(c.index) for c in cases],
            }
            for a, b, cases in sel.pairs
        ],
        "mistakes": [shown(c.index) for c in sel.mistakes],
        "location": {
            "uri": data_uri(location_png(location, names)),
            "rows": [
                {"name": names[c], "images": len(sel.per_class[c]), "centre": centre_share(m)}
                for c, m in location.items()
            ],
        }
        if location
        else None,
    }


def _explainer(explained: dict[int, Explained]) -> dict[str, Any] | None:
    """What the explanations were computed with, as the worker reports it."""
    first = next(iter(explained.values()), None)
    if first is None:
        return None
    r = first.result
    return {"method": r["method"], "background": r["background"], "segments": r["segments"]["requested"],
            "samples": r["samples_requested"]}  # fmt: skip


def build(
    registry: Registry,
    version: str | None,
    data_src: str,
    *,
    split: str | None = None,
    holdout: bool = False,
    explain: int = 3,
    params: ExplainRequest | None = None,
    settings: ExplainSettings | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> Path:
    """Score ``version`` on ``data_src``, explain ``explain`` images per class and the mistakes
    on the workers, write the HTML report to ``out`` (default: the version's report.html)."""
    settings = settings or ExplainSettings()
    params = params or report_request(settings)
    loaded = registry.load(version)
    version = loaded.version
    data = load_eval_images(loaded, data_src, split=split, holdout=holdout, progress=progress)
    probs = predict_probabilities(loaded.model, data.images, progress=progress)
    y = data.labels.numpy()
    scored = Scored(loaded.class_names, data.images.numpy(), y, probs,
                    compute_metrics(y, probs.argmax(1), loaded.class_names))  # fmt: skip
    sel = select(probs, y, np.asarray(scored.metrics["confusion_matrix"]), explain)
    todo = sel.indices() if explain > 0 else []
    results = explain_images(scored.images[todo], [int(y[i]) for i in todo], version, params, settings,
                             progress=progress)  # fmt: skip
    explained = dict(zip(todo, results, strict=True))
    context = {
        "version": version,
        "meta": loaded.metadata,
        "data": {"source": data_src, "split": data.split, "images": len(data), "skipped": len(data.skipped)},
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": scored.metrics,
        "study": STUDY,
        "weakest": sorted(scored.names, key=lambda n: scored.metrics["per_class"][n]["f1"])[:3],
        "class_names": scored.names,
        "explain": explain,
        "explainer": _explainer(explained),
        **_figures(scored, registry.history(version), version, data.split),
        **_sections(scored, sel, explained),
    }
    into_version = out is None
    out = out or loaded.path / REPORT_HTML
    _write_atomically(out, render(context))
    if into_version:
        registry.attach(version, REPORT_HTML)  # recorded with its sha256 (and uploaded, on a store)
    return out


def render(context: dict[str, Any]) -> str:
    """The report's HTML (``templates/report.html``, autoescaped; a missing name is an error)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("training", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["a_or_an"] = a_or_an
    return env.get_template("report.html").render(**context)


def _write_atomically(path: Path, text: str) -> None:
    """The API may be serving the previous report: replace it whole, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, text.encode("utf-8"))
