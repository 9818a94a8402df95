"""Data sources: torchvision's CIFAR-10 download, a folder, or a .tar/.tar.gz archive.

Folders and archives are laid out as ``<split>/<class>/<image>`` (torchvision's
ImageFolder layout under a split folder). Everything is decoded once into a uint8 tensor
(N, 3, 32, 32) held in memory -- CIFAR-10 is 150 MB that way -- and cached on disk as
safetensors keyed by the source's sha256, so later runs start in a second.

Corrupt images inside a source are skipped with a warning and counted (``skipped``); a
source in which nothing decodes, or whose layout is wrong, is refused with a UserError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shapcore.errors import InputError, UserError
from shapcore.images import image_to_tensor
from shapcore.model import CIFAR10_CLASSES, SOURCE_SIZE
from shapcore.store import sha256_file
from training.settings import TrainingSettings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CIFAR10_NAME = "cifar10"
#: A training image is refused above this many pixels (its header says), as the service refuses uploads.
MAX_IMAGE_PIXELS = 16_777_216
LAYOUT_HINT = "expected <split>/<class>/<image>, e.g. train/cat/0001.jpg"


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, SOURCE_SIZE, SOURCE_SIZE)
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]
    source: str
    split: str
    sha256: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())


def cache_root() -> Path:
    """``SHAPSERVE_CACHE`` (:class:`training.settings.TrainingSettings`)."""
    return TrainingSettings().shapserve_cache


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def load_images(
    src: str,
    split: str | Sequence[str] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ImageSet:
    """Load every image of one split of ``src``.

    ``split``: the split folder to read, or a list of preferred names (the first present
    wins); None takes the only split there is. ``class_names``: the label order to map
    folders onto (evaluation against a model); None means the classes found, in CIFAR-10
    order when they are CIFAR-10's, else alphabetical.
    """
    if src == CIFAR10_NAME:
        return _load_cifar10_download(split, class_names)
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"data source not found: {src} (a folder, a .tar/.tar.gz archive or 'cifar10')")
    if path.is_dir():
        entries = list(_scan_folder(path))
        sha = _sha256_entries(entries)
        reader = _folder_reader(path)
    elif path.is_file() and is_archive(path):
        sha = sha256_file(path)
        entries = None
        reader = None
    else:
        raise UserError(f"{src} is neither a folder nor a .tar/.tar.gz archive")

    names = _archive_names(path) if path.is_file() else [name for name, _ in entries]
    chosen, classes_found = _choose_split(names, split, src)
    classes = _class_order(classes_found, class_names, src)

    cache_file = cache_root() / "datasets" / f"{sha[:32]}-{chosen}-{_classes_key(classes)}.safetensors"
    if use_cache and cache_file.is_file():
        cached = load_file(str(cache_file))  # only complete, skip-free decodes are cached
        return ImageSet(cached["images"], cached["labels"], classes, src, chosen, sha)

    members = _archive_members(path, chosen) if path.is_file() else reader(chosen, entries)
    images, labels, skipped = _decode_all(members, classes, total=_count(names, chosen), progress=progress, src=src)
    if not labels:
        raise UserError(f"no readable image in split {chosen!r} of {src} ({LAYOUT_HINT})")
    result = ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes, src, chosen, sha, skipped)
    if use_cache and not skipped:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file({"images": result.images, "labels": result.labels}, str(tmp))
            os.replace(tmp, cache_file)
        except OSError as exc:  # a read-only cache only costs time
            log.warning("could not write dataset cache %s: %s", cache_file, exc)
    return result


# -- layout -------------------------------------------------------------------------------
def _split_parts(name: str) -> tuple[str, str, str] | None:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if len(parts) != 3 or PurePosixPath(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    if any(p.startswith(".") for p in parts):
        return None
    return parts[0], parts[1], parts[2]


def _choose_split(names: Sequence[str], split: str | Sequence[str] | None, src: str) -> tuple[str, list[str]]:
    splits: dict[str, set[str]] = {}
    for name in names:
        parts = _split_parts(name)
        if parts:
            splits.setdefault(parts[0], set()).add(parts[1])
    if not splits:
        raise UserError(f"{src}: no images in the expected layout ({LAYOUT_HINT})")
    if split is None:
        if len(splits) > 1:
            raise UserError(f"{src} holds several splits ({', '.join(sorted(splits))}); name one with --split")
        chosen = next(iter(splits))
    else:
        wanted = [split] if isinstance(split, str) else list(split)
        found = [s for s in wanted if s in splits]
        if not found:
            if isinstance(split, str) or len(splits) > 1:
                raise UserError(f"{src}: no split {' or '.join(map(repr, wanted))}; found {', '.join(sorted(splits))}")
            found = [next(iter(splits))]
        chosen = found[0]
    return chosen, sorted(splits[chosen])


def _class_order(found: list[str], class_names: Sequence[str] | None, src: str) -> list[str]:
    if class_names is not None:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise UserError(f"{src}: classes {', '.join(unknown)} are not among the model's classes")
        return list(class_names)
    if set(found) == set(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    if len(found) < 2:
        raise UserError(f"{src}: need at least 2 class folders, found {found} ({LAYOUT_HINT})")
    return sorted(found)


def _classes_key(classes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]


def _count(names: Sequence[str], split: str) -> int:
    return sum(1 for n in names if (p := _split_parts(n)) and p[0] == split)


# -- folders ------------------------------------------------------------------------------
def _scan_folder(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            yield full.relative_to(root).as_posix(), full


def _sha256_entries(entries: Sequence[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for rel, full in entries:
        if _split_parts(rel):
            digest.update(rel.encode() + b"\0")
            digest.update(full.read_bytes())
    return digest.hexdigest()


def _folder_reader(root: Path):
    def read(split: str, entries: Sequence[tuple[str, Path]]) -> Iterator[tuple[str, str, bytes]]:
        for rel, full in entries:
            parts = _split_parts(rel)
            if parts and parts[0] == split:
                yield rel, parts[1], full.read_bytes()

    return read


# -- archives -----------------------------------------------------------------------------
def _open_tar(path: Path, stream: bool) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r|*" if stream else "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable tar archive: {exc}") from None


def _archive_names(path: Path) -> list[str]:
    names = []
    try:
        with _open_tar(path, stream=True) as tar:
            for member in tar:
                if member.isfile():
                    names.append(member.name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path}: archive is damaged: {exc}") from None
    return names


def _archive_members(path: Path, split: str) -> Iterator[tuple[str, str, bytes]]:
    try:
        with _open_tar(path, stream=True) as tar:
            for member in tar:
                parts = _split_parts(member.name) if member.isfile() else None
                if parts and parts[0] == split:
                    fh = tar.extractfile(member)
                    yield member.name, parts[1], fh.read() if fh else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path}: archive is damaged: {exc}") from None


# -- decoding -----------------------------------------------------------------------------
def _decode_all(
    members: Iterator[tuple[str, str, bytes]],
    classes: Sequence[str],
    *,
    total: int,
    progress: bool,
    src: str,
) -> tuple[list[torch.Tensor], list[int], list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    images: list[torch.Tensor] = []
    labels: list[int] = []
    skipped: list[str] = []
    for name, cls, payload in tqdm(
        members, total=total, desc=f"reading {Path(src).name}", unit="img", disable=not progress, leave=False
    ):
        if cls not in index:
            continue
        try:
            # The service's own decoder: EXIF rotation, transparency onto white, 16-bit scaling.
            images.append(image_to_tensor(payload, MAX_IMAGE_PIXELS))
        except InputError as exc:
            skipped.append(name)
            log.warning("skipping unreadable image %s: %s", name, exc.message)
            continue
        labels.append(index[cls])
    if skipped:
        log.warning("%s: skipped %d unreadable image(s)", src, len(skipped))
    return images, labels, skipped


def _load_cifar10_download(split: str | Sequence[str] | None, class_names: Sequence[str] | None) -> ImageSet:
    """torchvision's CIFAR-10 download (needs the network the first time)."""
    from torchvision.datasets import CIFAR10

    wanted = [split] if isinstance(split, str) else list(split or ["train"])
    name = "test" if wanted[0] == "test" else "train"
    root = cache_root() / "torchvision"
    try:
        ds = CIFAR10(root=str(root), train=(name == "train"), download=True)
    except Exception as exc:  # URLError, gaierror, ...: no network
        raise UserError(
            f"could not download CIFAR-10 into {root} ({exc}). Offline? Point --data (`make run DATA=...`) "
            f"at a local copy: a folder or .tar/.tar.gz laid out as <split>/<class>/<image>, "
            f"e.g. train/cat/0001.png"
        ) from None
    if class_names is not None and list(class_names) != list(ds.classes):
        raise UserError("the model's classes are not CIFAR-10's")
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    assert images.shape[-1] == SOURCE_SIZE
    archive = root / CIFAR10.filename
    sha = sha256_file(archive) if archive.exists() else f"md5:{CIFAR10.tgz_md5}"
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes), CIFAR10_NAME, name, sha)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 80/20 (by default) split, as index tensors; the same seed gives the same split."""
    n_val = round(n * val_fraction)
    generator = torch.Generator().manual_seed(seed)
    train, val = torch.utils.data.random_split(range(n), [n - n_val, n_val], generator=generator)
    return torch.tensor(train.indices, dtype=torch.int64), torch.tensor(val.indices, dtype=torch.int64)


def pick_background(labels: torch.Tensor, count: int, seed: int, num_classes: int) -> torch.Tensor:
    """Indices of ``count`` images, spread evenly over the classes, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    chosen: list[torch.Tensor] = []
    for c, idx in enumerate(per_class):
        share = count // num_classes + (1 if c < count % num_classes else 0)
        if len(idx):
            chosen.append(idx[torch.randperm(len(idx), generator=generator)[:share]])
    picked = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.int64)
    return picked[:count]
