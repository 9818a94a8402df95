"""What an explanation may be asked for (``shapcore.explain``: the request's rules, the method
registry, the background names) and the fills it names (``shapcore.background``): names and
aliases, every rule of :meth:`ExplainRequest.build`, the dedupe key, k-means with an empty cluster."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shapcore.background import make_background, summarize_background
from shapcore.explain.background import BackgroundSpec, parse_background
from shapcore.explain.methods import METHODS, QUEUED_METHODS
from shapcore.explain.request import ExplainRequest, InvalidRequest, min_samples
from shapcore.jobs import queue
from shapcore.jobs.image import JobImage
from shapcore.jobs.queue import JobRequest, dedup_key
from shapcore.jobs.settings import ExplainSettings


@pytest.mark.parametrize(
    ("raw", "name", "count"),
    [
        ("mean", "mean", 1),
        (" Blur ", "blur", 1),
        ("train:100", "train:100", 100),
        ("train:7", "train:7", 7),
        ("kmeans:5", "kmeans:5", 5),
        ("1", "mean", 1),  # the integer aliases the API always took
        (1, "mean", 1),
        ("100", "train:100", 100),
        ("3", "kmeans:3", 3),
    ],
)
def test_background_names_and_aliases(raw, name, count):
    spec = parse_background(raw, 100)
    assert (spec.name, spec.count) == (name, count)
    assert parse_background(spec.name, 100) == spec  # the canonical name parses to itself


@pytest.mark.parametrize("raw", ["0", "101", "train:0", "kmeans:101", "train", "sky", "train:-1", "1.5", ""])
def test_bad_backgrounds_are_refused_with_the_choices(raw):
    with pytest.raises(ValueError, match="background must be"):
        parse_background(raw, 100)


def test_min_samples_is_four_per_segment():
    assert min_samples(50) == 200 and min_samples(200) == 800


SETTINGS = ExplainSettings(_env_file=None)


@pytest.mark.parametrize(
    ("given", "field", "words"),
    [
        ({"method": "lime"}, "method", "method must be one of kernel"),
        ({"segments": 1}, "segments", "from 2 to 200"),
        ({"samples": 100_000}, "samples", "from 20 to 20000"),
        ({"samples": "most"}, "samples", "auto or an integer"),
        ({"seed": -1}, "seed", "from 0 to"),
        ({"samples": 199, "segments": 50}, "samples", "needs at least 200"),
        ({"samples": 20_000, "background": "train:100"}, "samples", "over the limit of 500000"),
        ({"background": "sky"}, "background", "background must be one of"),
        ({"players": "hexagons"}, "players", "players must be one of slic, grid"),
        ({"method": "fast", "players": "slic"}, "players", "players=slic is not available"),
        ({"method": "fast", "background": "blur"}, "background", "mean background only"),
        ({"target": 10, "class_count": 10}, "target", "from 0 to 9"),
    ],
)
def test_every_rule_of_a_request_is_checked_in_one_place(given, field, words):
    with pytest.raises(InvalidRequest, match=words) as refused:
        ExplainRequest.build(SETTINGS, **given)
    assert refused.value.field == field


def test_a_request_takes_the_settings_defaults_and_the_methods_bound_players():
    default = ExplainRequest.build(SETTINGS)
    assert (default.method, default.players, default.segments, default.samples, default.background) == (
        "adjusted", "slic", 50, "auto", "mean")  # fmt: skip
    assert default.auto and default.budget == SETTINGS.explain_auto_cap == 5000
    fixed = ExplainRequest.build(SETTINGS, samples=800)
    assert not fixed.auto and fixed.budget == 800
    assert ExplainRequest.build(SETTINGS, samples="AUTO").samples == "auto"
    grid = ExplainRequest.build(SETTINGS, players="grid", segments=10)
    assert grid.segments == 64  # the grid's cells, whatever segments said
    fast = ExplainRequest.build(SETTINGS, method="FAST")
    assert (fast.method, fast.players, fast.background) == ("fast", "grid", "mean")
    assert ExplainRequest.build(SETTINGS, background="100").background == "train:100"
    # the sample floor applies to the sampled methods only
    assert ExplainRequest.build(SETTINGS, method="gradcam", samples=20).samples == 20


def test_the_method_registry_declares_each_method_once():
    """Every queued method's entry point resolves to its module's ``attribute`` (the worker runs
    methods by name through the registry); inline methods are not the worker's."""
    from worker.methods import resolve

    assert set(QUEUED_METHODS) | {"fast"} == set(METHODS)
    for name in QUEUED_METHODS:
        assert callable(resolve(name)) and resolve(name).__module__ == f"worker.methods.{name}"
    with pytest.raises(ValueError, match="answered by the API"):
        resolve("fast")


def _request(**changes) -> JobRequest:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    base = JobRequest.of(JobImage.from_arrays(pixels, np.zeros((3, 32, 32), dtype=np.uint8)), "v1", segments=50,
                         samples=5000, background="mean", seed=0, target=None)  # fmt: skip
    version = changes.pop("model_version", base.model_version)
    return dataclasses.replace(base, model_version=version, explain=base.explain.model_copy(update=changes))


@pytest.mark.parametrize(
    "change",
    [
        {"slic_compactness": 20.0},  # a worker-side SLIC setting
        {"method": "partition"},
        {"background": "train:100"},
        {"samples": 5001},
        {"model_version": "v2"},
        {"players": "grid"},
        {"target": 3},
    ],
)
def test_the_dedupe_key_changes_with_every_setting_that_changes_a_result(change):
    assert dedup_key(_request(**change)) != dedup_key(_request())
    assert dedup_key(_request(**change)) == dedup_key(_request(**change))


def test_the_dedupe_key_changes_with_the_explainer_code(monkeypatch):
    before = dedup_key(_request())
    monkeypatch.setattr(queue, "EXPLAINER_REVISION", queue.EXPLAINER_REVISION + 1)
    assert dedup_key(_request()) != before
    monkeypatch.undo()
    monkeypatch.setattr(queue, "_version", lambda package: "9.9.9" if package == "shap" else "0")
    assert dedup_key(_request()) != before


def _stored(distinct: int, n: int = 100) -> torch.Tensor:
    """``n`` uint8 images of which only ``distinct`` differ: k-means over more clusters than that
    leaves some empty."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (distinct, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return pool[torch.arange(n) % distinct]


def test_kmeans_with_an_empty_cluster_returns_the_clusters_it_found():
    """Five clusters asked of images with three distinct values: two come out empty. The
    summary keeps the three (it used to reshape to five rows and crash)."""
    stored = _stored(3)
    bg = summarize_background(stored, 5)
    assert len(bg) == 3
    assert bg.weights.sum().item() == pytest.approx(1.0)
    distinct = {tuple(img.flatten()[:8].tolist()) for img in stored.float() / 255.0}
    assert {tuple(img.flatten()[:8].tolist()) for img in bg.images} == distinct
    assert len(make_background(BackgroundSpec("kmeans", 5), stored, stored[0])) == 3


def test_train_k_takes_k_stored_images_from_across_the_set():
    stored = _stored(100)  # all distinct; stored grouped by class in a real version
    bg = make_background(BackgroundSpec("train", 10), stored, stored[0])
    assert len(bg) == 10 and torch.allclose(bg.weights, torch.full((10,), 0.1))
    picked = [int(np.argmin([(bg.images[i] - s.float() / 255).abs().sum() for s in stored])) for i in range(10)]
    assert len(set(picked)) == 10 and max(picked) >= 20  # not the first ten (one class in a real version)
    full = make_background(BackgroundSpec("train", 100), stored, stored[0])
    assert len(full) == 100


def test_blur_fills_with_the_image_itself_blurred():
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 32, 32), generator=gen, dtype=torch.uint8)
    bg = make_background(BackgroundSpec("blur"), _stored(5), image)
    assert bg.images.shape == (1, 3, 32, 32)
    x = image.float() / 255.0
    # the same mean colour as the image, far less pixel-to-pixel variation
    assert torch.allclose(bg.images[0].mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=0.03)
    assert bg.images[0].std() < 0.3 * x.std()
    other = make_background(BackgroundSpec("blur"), _stored(5), 255 - image)
    assert not torch.allclose(other.images, bg.images)  # made from each image, not from the stored set


def test_a_misspelt_default_background_is_refused_at_start_up():
    from pydantic import ValidationError

    from shapcore.jobs.settings import ExplainSettings

    assert ExplainSettings(explain_default_background="100").explain_default_background == "train:100"
    with pytest.raises(ValidationError, match="background must be one of"):
        ExplainSettings(explain_default_background="sky")
