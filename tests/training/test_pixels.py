"""Training sees the very pixels /predict builds: one decoder (``shapcore.images``) for both.

A small archive of real CIFAR-10 images also holds an RGBA PNG with real transparency and
an EXIF-rotated, non-square JPEG: the two files where a naive ``Image.open().convert("RGB")``
gives other pixels (transparency dropped instead of composited on white; the image left
sideways). Training must decode them as the service does, and train on such an archive.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.routers.predict import _decode as predict_decode
from service.settings import get_settings
from shapcore.model import to_source_size
from training.data import load_images

#: Keys of ``odd_images`` (tests/support/services.py) added to the archive, in this order, as cats.
ODD = ("rgba_png", "exif_rotated_jpeg")


@pytest.fixture(scope="module")
def odd_archive(small_archive: Path, odd_images: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_archive``'s 300 real images, then the two odd files as its last members."""
    dest = tmp_path_factory.mktemp("odd") / "odd.tar.gz"
    with tarfile.open(small_archive) as tin, tarfile.open(dest, "w:gz") as tout:
        for member in tin:
            tout.addfile(member, tin.extractfile(member))
        for key in ODD:
            filename, data, _ = odd_images[key]
            info = tarfile.TarInfo(f"train/cat/zz-{filename}")
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dest


def test_odd_files_are_really_odd(odd_images: dict) -> None:
    """The inputs themselves: transparency that matters, and a sideways non-square picture."""
    rgba = Image.open(io.BytesIO(odd_images["rgba_png"][1]))
    assert rgba.mode == "RGBA" and rgba.getextrema()[3][0] < 255
    rotated = Image.open(io.BytesIO(odd_images["exif_rotated_jpeg"][1]))
    assert rotated.getexif()[0x0112] in (6, 8) and rotated.width != rotated.height


def test_training_decodes_each_image_as_predict_does(odd_archive: Path, odd_images: dict) -> None:
    data = load_images(str(odd_archive), split="train", use_cache=False, progress=False)
    assert len(data) == 302 and not data.skipped
    cat = data.class_names.index("cat")
    max_pixels = get_settings().max_image_pixels
    for position, key in zip((300, 301), ODD, strict=True):  # an archive is read in member order
        raw = odd_images[key][1]
        trained = data.images[position]
        served = predict_decode(raw, max_pixels)[0]  # the tensor /predict batches for this upload
        assert data.labels[position] == cat
        assert trained.dtype == served.dtype == torch.uint8
        assert torch.equal(trained, served), key
        naive = to_source_size(Image.open(io.BytesIO(raw)).convert("RGB"))
        # far apart, not one rounding step: a naive decode would train on other pictures
        assert (trained.int() - naive.int()).abs().max() > 50, key


def test_smoke_training_on_the_odd_archive(odd_archive: Path, tmp_path: Path) -> None:
    from training.cli import main

    registry = tmp_path / "registry"
    args = ["--quiet", "--registry", str(registry), "train", "--data", str(odd_archive), "--profile", "smoke"]
    assert main(args) == 0
    (version,) = [p for p in registry.iterdir() if not p.name.startswith(".")]
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["data"]["images"] == 302 and meta["data"]["skipped_images"] == 0
    assert meta["epochs_run"] == 1
