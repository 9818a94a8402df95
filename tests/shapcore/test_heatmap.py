"""What the explanation heatmap shows (shapcore/heatmap.py), read back from its pixels.

A real CIFAR-10 image cut into four known superpixels (its quadrants), SHAP values chosen per
quadrant, the PNG decoded with Pillow and its panels found as the large non-white blocks.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shapcore.heatmap import _cmap, render_heatmap

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Per quadrant (top-left, top-right, bottom-left, bottom-right): strongly positive, half as
#: positive, half as negative, strongly negative; the same magnitudes on either side of zero.
PATTERN = [1.0, 0.5, -0.5, -1.0]
#: Panel coordinates (fractions of width, height) of each quadrant's centre.
CENTRES = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]


@pytest.fixture(scope="module")
def picture(cat_rgb: Image.Image) -> np.ndarray:
    return np.asarray(cat_rgb)


@pytest.fixture(scope="module")
def quadrants() -> np.ndarray:
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[:16, 16:] = 1
    labels[16:, :16] = 2
    labels[16:, 16:] = 3
    return labels


def result_with(values: dict[int, list[float]]) -> dict:
    """A finished job's result: ``values`` per class index, zeros for the other classes."""
    classes = [
        {"index": i, "label": name, "probability": 0.1, "shap_values": values.get(i, [0.0] * 4), "base_value": 0.1}
        for i, name in enumerate(CLASSES)
    ]
    top = {"index": 0, "label": CLASSES[0], "probability": 0.1}
    return {"classes": classes, "predicted": top, "target": top}


def render(picture: np.ndarray, labels: np.ndarray, values: dict[int, list[float]], classes: list[int]) -> np.ndarray:
    png = render_heatmap(picture, labels, result_with(values), classes)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.float64)


def panels(pixels: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each panel, left to right: the non-white blocks at least
    150 px in both directions (titles are smaller, the colour bar is flat)."""
    from scipy import ndimage

    ink = (pixels < 235).any(axis=-1)
    blobs, _ = ndimage.label(ink)
    boxes = []
    for rows, cols in ndimage.find_objects(blobs):
        if rows.stop - rows.start >= 150 and cols.stop - cols.start >= 150:
            boxes.append((rows.start, rows.stop, cols.start, cols.stop))
    return sorted(boxes, key=lambda box: box[2])


def colour_at(pixels: np.ndarray, box: tuple[int, int, int, int], quadrant: int) -> np.ndarray:
    """Median colour of a 7x7 patch at the centre of ``quadrant`` in the panel ``box``."""
    top, bottom, left, right = box
    fx, fy = CENTRES[quadrant]
    y, x = int(top + fy * (bottom - top)), int(left + fx * (right - left))
    return np.median(pixels[y - 3 : y + 4, x - 3 : x + 4].reshape(-1, 3), axis=0)


def is_red(rgb: np.ndarray) -> bool:
    return rgb[0] > rgb[2] + 60 and rgb[0] > rgb[1] + 60


def is_blue(rgb: np.ndarray) -> bool:
    return rgb[2] > rgb[0] + 60


def test_red_over_the_positive_superpixel_and_blue_over_the_negative_one(picture, quadrants):
    pixels = render(picture, quadrants, {3: PATTERN}, [3])
    boxes = panels(pixels)
    assert len(boxes) == 2, boxes  # the input and the one class panel
    panel = boxes[1]
    strong_pos, strong_neg = colour_at(pixels, panel, 0), colour_at(pixels, panel, 3)
    assert is_red(strong_pos), strong_pos
    assert is_blue(strong_neg), strong_neg
    # The strongest values take the colour map's ends, opaque: the grey picture does not show.
    cmap = _cmap()
    np.testing.assert_allclose(strong_pos, np.asarray(cmap(1.0)[:3]) * 255, atol=4)
    np.testing.assert_allclose(strong_neg, np.asarray(cmap(0.0)[:3]) * 255, atol=4)


def test_the_colour_scale_is_symmetric_around_zero(picture, quadrants):
    """Equal magnitudes of opposite sign are drawn equally strongly. The strength of the colour
    at a pixel (its alpha over the grey picture) is read against a render with all values zero,
    where the map is transparent: drawn = alpha * colour + (1 - alpha) * grey."""
    cmap = _cmap()
    red, blue = np.asarray(cmap(1.0)[:3]) * 255, np.asarray(cmap(0.0)[:3]) * 255
    drawn = render(picture, quadrants, {3: PATTERN}, [3])
    bare = render(picture, quadrants, {3: [0.0] * 4}, [3])
    box = panels(drawn)[1]
    assert panels(bare)[1] == box

    def strength(quadrant: int, colour: np.ndarray) -> float:
        grey = colour_at(bare, box, quadrant)
        seen = colour_at(drawn, box, quadrant)
        channel = int(np.argmax(np.abs(colour - grey)))  # the channel the colour moves most
        return float((seen[channel] - grey[channel]) / (colour[channel] - grey[channel]))

    assert strength(0, red) == pytest.approx(1.0, abs=0.03)
    assert strength(3, blue) == pytest.approx(1.0, abs=0.03)
    half_pos, half_neg = strength(1, red), strength(2, blue)
    assert 0.2 < half_pos < 0.8 and 0.2 < half_neg < 0.8, (half_pos, half_neg)
    assert half_pos == pytest.approx(half_neg, abs=0.05)


def test_classes_select_which_panels_are_drawn(picture, quadrants):
    mirrored = [-v for v in PATTERN]
    values = {0: PATTERN, 5: mirrored, 9: PATTERN}

    one = render(picture, quadrants, values, [5])
    boxes = panels(one)
    assert len(boxes) == 2
    assert is_blue(colour_at(one, boxes[1], 0)) and is_red(colour_at(one, boxes[1], 3))  # class 5's values

    two = render(picture, quadrants, values, [0, 5])
    boxes = panels(two)
    assert len(boxes) == 3
    assert is_red(colour_at(two, boxes[1], 0)) and is_blue(colour_at(two, boxes[2], 0))  # in the order asked

    every = render(picture, quadrants, {i: PATTERN for i in range(10)}, list(range(10)))
    assert len(panels(every)) == 11
