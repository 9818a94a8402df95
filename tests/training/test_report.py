"""The study's report (``python -m training report``) and ``GET /model/report``.

The report is made from a real smoke version scored on real held-out CIFAR-10 images, its
explanations computed by a real ``python -m worker`` through Redis. What it must be: one
self-contained HTML file (no URL outside it: every picture a ``data:`` PNG), naming every
class, holding the SHAP heatmaps of each section.
"""

from __future__ import annotations

import base64
import io
import shutil
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shapcore.registry import REPORT_HTML, Registry
from training.cli import main
from training.report import a_or_an, attribution_location, centre_share, confused_pairs, most_confident

pytestmark = pytest.mark.timeout(600)

QUEUE = f"explain-report-{uuid.uuid4().hex[:6]}"
FAST = ["--segments", "12", "--samples", "120"]


class Tags(HTMLParser):
    """Every start tag's attributes, and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    return tags


def png_of(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True)))


@pytest.fixture(scope="module")
def report_registry(smoke_model: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    src, version = smoke_model
    dest = tmp_path_factory.mktemp("report") / "registry"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".runs", ".incoming"))
    return dest, version


@pytest.fixture(scope="module")
def report(
    report_registry: tuple[Path, str],
    small_test_archive: Path,
    start_worker,
    explain_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """The report of the smoke version on 100 held-out images, one explanation per class."""
    registry, version = report_registry
    start_worker(registry, env={"EXPLAIN_QUEUE": QUEUE})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", explain_redis_url)
        mp.setenv("EXPLAIN_QUEUE", QUEUE)
        code = main(["--quiet", "--registry", str(registry), "report", "--version", version,
                     "--data", str(small_test_archive), "--explain", "1", *FAST])  # fmt: skip
    assert code == 0
    path = Registry(registry).path(version) / REPORT_HTML
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained(report: str) -> None:
    """Nothing in it points outside it: pictures are data: PNGs, links are in-page anchors,
    no script, no stylesheet or font to fetch (and no "://" anywhere: ':' is not base64)."""
    page = parse(report)
    assert "://" not in report
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) >= 4
    for attrs in images:
        png_of(attrs["src"]).verify()
        assert attrs.get("alt"), "every picture has alt text"
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs["href"]
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
    assert "url(" not in report.split("</style>")[0].split("<style>")[1]


def test_report_names_every_class_and_holds_heatmaps(report: str, report_registry: tuple[Path, str]) -> None:
    registry, version = report_registry
    classes = Registry(registry).metadata(version)["class_names"]
    page = parse(report)
    text = " ".join(page.text)
    assert "Table 4" in text and "Table 5" in text and version in text
    for name in classes:
        assert f'<th scope="row">{name}</th>' in report, f"Table 5 has no row for {name}"
    heatmaps = [a for t, a in page.tags if t == "img" and a.get("alt", "").startswith("SHAP heatmap of ")]
    # one per class, then the confused pairs' and the confident mistakes'
    for name in classes:
        assert any(a["alt"].startswith(f"SHAP heatmap of {a_or_an(name)} image") for a in heatmaps), name
    assert len(heatmaps) > len(classes)
    for attrs in heatmaps:
        picture = png_of(attrs["src"])
        panels = 2 + attrs["alt"].split("for the classes ")[1].count(", ")  # the input + one per class
        # the renderer's panels are 300 px wide: the width says how many classes are drawn
        assert picture.width >= 300 * panels, (picture.size, attrs["alt"])
    # a mistake's heatmap shows the true and the predicted class side by side
    mistakes = [a for a in heatmaps if ", " in a["alt"].split("for the classes ")[1]]
    assert mistakes, "no heatmap of a mistake with both classes"
    assert "Where the attributions fall" in text and "Share in the central quarter" in text


def test_model_report_route(report: str, report_registry: tuple[Path, str], own_service, service) -> None:
    """404 naming the command while a version has no report; the file itself, locked down by CSP, once written."""
    missing = service.client.get("/model/report")
    assert missing.status_code == 404 and "python -m training report" in missing.json()["error"]["message"]
    assert service.client.get("/model").json()["report_url"] is None

    registry, _ = report_registry
    api = own_service(registry=registry)
    assert api.client.get("/model").json()["report_url"] == "/model/report"
    r = api.client.get("/model/report")
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.text == report


def test_report_without_a_worker_names_the_remedy(
    report_registry: tuple[Path, str], small_test_archive: Path, explain_redis_url: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    registry, _ = report_registry
    monkeypatch.setenv("REDIS_URL", explain_redis_url)
    monkeypatch.setenv("EXPLAIN_QUEUE", f"nobody-listens-{uuid.uuid4().hex[:6]}")
    args = ["--quiet", "--registry", str(registry), "report", "--data", str(small_test_archive), *FAST]
    assert main([*args, "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "no worker listens" in err and "python -m worker" in err and "--explain 0" in err
    assert not (tmp_path / "r.html").exists()

    # --explain 0: the tables and figures without explanations, no Redis needed
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main([*args, "--explain", "0", "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "SHAP heatmap of" not in html and "--explain 0" in html and "Table 5" in html


def test_report_refuses_bad_explanation_options(
    report_registry: tuple[Path, str], small_test_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, _ = report_registry
    base = ["--quiet", "--registry", str(registry), "report", "--data", str(small_test_archive)]
    assert main([*base, "--segments", "12", "--samples", "20"]) == 2
    assert "too few for segments=12" in capsys.readouterr().err
    assert main([*base, "--background", "train:500"]) == 2
    assert "background must be from 1 to 100" in capsys.readouterr().err


# -- the figures, on data whose answer is known -------------------------------------------------


def test_confused_pairs_and_confident_mistakes() -> None:
    cm = np.array([[5, 1, 0], [4, 6, 2], [0, 3, 7]])
    assert confused_pairs(cm, 2) == [(0, 1, 5), (1, 2, 5)]
    assert confused_pairs(np.eye(3, dtype=int), 3) == []  # nothing confused, no pair
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    y = np.array([0, 0, 1, 0])
    mistakes = most_confident(probs, y, probs.argmax(1) != y, 5)
    assert [(m.index, m.predicted) for m in mistakes] == [(0, 1), (3, 1)]


class _Map:
    """An explanation whose attribution map for every class is ``values``."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def attribution_map(self, cls: int) -> np.ndarray:
        return self.values


def test_centre_share_moves_with_where_the_evidence_is() -> None:
    """Spread evenly: 0.25 (a quarter of the area); all on the centre: 1; all on the border: 0.
    Negative values are not evidence for the class and do not count."""
    even = attribution_location([_Map(np.ones((32, 32)))], 0)
    assert centre_share(even) == pytest.approx(0.25)
    centred = np.zeros((32, 32))
    centred[12:20, 12:20] = 1.0
    border = -centred + 0.0
    border[0, :] = 2.0
    assert centre_share(attribution_location([_Map(centred)], 0)) == pytest.approx(1.0)
    assert centre_share(attribution_location([_Map(border)], 0)) == pytest.approx(0.0)
    # the mean of the two: each map counts alike, whatever its scale
    both = attribution_location([_Map(centred * 100), _Map(border)], 0)
    assert centre_share(both) == pytest.approx(0.5)
    # a larger picture's map is read on the same 32 x 32 grid
    big = np.kron(centred, np.ones((4, 4)))
    assert centre_share(attribution_location([_Map(big)], 0)) == pytest.approx(1.0)
