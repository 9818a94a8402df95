"""Data sources: folder, archive, class order, split sizes, seeded determinism, bad layouts."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from shapcore.errors import UserError
from shapcore.model import CIFAR10_CLASSES
from training.data import load_images, pick_background, split_train_val


def test_archive_source_reads_every_image_in_cifar_order(small_archive: Path) -> None:
    data = load_images(str(small_archive), split=["train"], use_cache=False, progress=False)
    assert data.class_names == list(CIFAR10_CLASSES)
    assert data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [30] * 10
    assert data.split == "train" and len(data.sha256) == 64


def test_folder_source_matches_archive(small_archive: Path, tmp_path: Path) -> None:
    with tarfile.open(small_archive) as tar:
        tar.extractall(tmp_path, filter="data")
    from_folder = load_images(str(tmp_path), split="train", use_cache=False, progress=False)
    from_archive = load_images(str(small_archive), split="train", use_cache=False, progress=False)
    assert from_folder.class_names == from_archive.class_names
    # same images, same labels (order of members may differ): compare per-class pixel sums
    for c in range(10):
        a = from_folder.images[from_folder.labels == c].double().sum()
        b = from_archive.images[from_archive.labels == c].double().sum()
        assert a == b


def test_cache_returns_identical_tensors(small_archive: Path) -> None:
    first = load_images(str(small_archive), split="train", progress=False)
    second = load_images(str(small_archive), split="train", progress=False)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_split_sizes_and_determinism() -> None:
    train, val = split_train_val(50_000, 0.2, seed=42)
    assert len(train) == 40_000 and len(val) == 10_000
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000
    train2, val2 = split_train_val(50_000, 0.2, seed=42)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    train3, _ = split_train_val(50_000, 0.2, seed=43)
    assert not torch.equal(train, train3)


def test_background_is_spread_over_classes() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    idx = pick_background(labels, 100, seed=42, num_classes=10)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert torch.bincount(labels[idx]).tolist() == [10] * 10
    assert torch.equal(idx, pick_background(labels, 100, seed=42, num_classes=10))


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def test_corrupt_image_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = {f"train/{c}/{i}.jpg": _jpeg((i * 20, 0, 0)) for c in ("cat", "dog") for i in range(3)}
    files["train/cat/broken.jpg"] = _jpeg((1, 2, 3))[:40]
    src = _tar(tmp_path / "a.tar.gz", files)
    data = load_images(str(src), split="train", progress=False)
    assert len(data) == 6 and data.skipped == ["train/cat/broken.jpg"]
    assert "skipping unreadable image train/cat/broken.jpg" in caplog.text


def test_non_cifar_classes_are_alphabetical(tmp_path: Path) -> None:
    files = {f"test/{c}/0.png": _jpeg((0, 0, 0)) for c in ("zebra", "apple", "mango")}
    data = load_images(str(_tar(tmp_path / "b.tar", files)), progress=False)
    assert data.class_names == ["apple", "mango", "zebra"] and data.split == "test"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"cat/0.jpg": b"x"}, "expected <split>/<class>/<image>"),
        ({"readme.txt": b"hello"}, "expected <split>/<class>/<image>"),
        ({"train/cat/0.jpg": b"not a jpeg", "train/dog/0.jpg": b"nope"}, "no readable image"),
    ],
)
def test_wrong_layouts_are_refused(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_images(str(_tar(tmp_path / "c.tar.gz", files)), split=["train"], progress=False)


def test_missing_source_and_split() -> None:
    with pytest.raises(UserError, match="data source not found"):
        load_images("/nonexistent/cifar.tar.gz")


def test_eval_classes_must_be_known(tmp_path: Path) -> None:
    files = {f"test/{c}/0.jpg": _jpeg((0, 0, 0)) for c in ("cat", "unicorn")}
    with pytest.raises(UserError, match="unicorn"):
        load_images(str(_tar(tmp_path / "d.tar.gz", files)), class_names=CIFAR10_CLASSES, progress=False)


def _content_hashes(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return [hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()]


def test_the_test_split_is_held_out_of_the_training_archive(small_archive: Path, small_test_archive: Path) -> None:
    """Evaluation must score images the model never trained on: no test image is a training image."""
    train = _content_hashes(small_archive)
    test = _content_hashes(small_test_archive)
    assert (len(train), len(test)) == (300, 100)
    assert len(set(test)) == 100  # a CIFAR-10 image is not stored twice
    assert set(train).isdisjoint(test)
