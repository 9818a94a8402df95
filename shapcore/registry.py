"""The checkpoint registry: one immutable folder per version, written atomically, in a local
folder or on S3-compatible storage (:mod:`shapcore.store`: ``MODEL_REGISTRY=s3://bucket/prefix``).

Layout of ``<registry>/<version>/``:

- ``model.safetensors``      the network's weights (no pickle anywhere)
- ``metadata.json``          architecture, classes, preprocessing, hyper-parameters, data, ...
- ``background.safetensors`` uint8 (N, 3, 32, 32) training images for the explainer
- ``history.json``           per-epoch training/validation curves
- ``metrics.json``, ``confusion_matrix.png``, ``training_curves.png``  after ``evaluate``

``<registry>/PROMOTED`` names the version served by default (one small file, or object).
A version is visible once its ``metadata.json`` exists, and that is written last: in a folder
the version is first written under ``<registry>/.incoming/`` and renamed into place, on a store
its other files are uploaded first. A crash mid-write leaves no half version visible. Ids sort
by creation time: ``YYYYMMDD-HHMMSS-xxxxxx``.

**Checksums.** ``metadata.json`` records every file's sha256 and size under ``files`` (files
added later through :meth:`Registry.attach`); a load checks the files it reads
(:data:`CORE_FILES`) and refuses one that differs (:mod:`shapcore.version_files`). **A store's
readers** keep ``MODEL_CACHE/<registry>/<version>/``, each file kept while its sha256 is the
recorded one; :meth:`Registry.local_dir` is that folder (for a folder registry, the version's own).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shapcore.errors import UserError
from shapcore.model import Classifier, Preprocess, build_model
from shapcore.settings import SharedSettings
from shapcore.store import Store, StoreUnavailable, cache_slug, file_record, write_file_atomic
from shapcore.version_files import METADATA, cached_complete, fetch_checked, refuse_if_differs

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
BACKGROUND = "background.safetensors"
#: Held-out validation images (and labels) recorded at training time: the checks made at load.
VALIDATION_SAMPLE = "validation_sample.safetensors"
HISTORY = "history.json"
METRICS = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
#: The study's report of a version (``python -m training report``), served at GET /model/report.
REPORT_HTML = "report.html"
PROMOTED = "PROMOTED"
INCOMING = ".incoming"
RUNS = ".runs"
#: The files a load reads, checked against their recorded sha256 at every load.
CORE_FILES = (WEIGHTS, BACKGROUND, VALIDATION_SAMPLE)


def default_registry() -> Path | str:
    """``MODEL_REGISTRY`` (:class:`shapcore.settings.SharedSettings`): where a ``Registry()`` given no root reads."""
    return SharedSettings().model_registry


def default_cache() -> Path:
    """``MODEL_CACHE``: where readers of a store-backed registry keep their copies."""
    return SharedSettings().model_cache


def new_version_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename it over: readers never see half a file."""
    write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


@dataclass
class LoadedVersion:
    """A version loaded for inference: the model (preprocess + network, eval mode) and its files."""

    version: str
    path: Path
    metadata: dict[str, Any]
    model: Classifier

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    def background(self) -> torch.Tensor:
        return load_file(str(self.path / BACKGROUND))["images"]

    def validation_sample(self) -> torch.Tensor:
        """uint8 images to check an inference form against fp32 on (:mod:`shapcore.gate`):
        the background images and, for versions trained since it is recorded, 500 held-out
        validation images. The model is surer of the background (training) images, so near-ties,
        where bf16 flips a prediction, are rarer there: the held-out part keeps the check honest."""
        parts = [self.background()]
        path = self.path / VALIDATION_SAMPLE
        if path.is_file():
            parts.append(load_file(str(path))["images"])
        return torch.cat(parts)

    def metrics(self) -> dict[str, Any] | None:
        path = self.path / METRICS
        return read_json(path) if path.exists() else None


class Registry:
    """The versions under ``root``: a folder (``Path``) or a store's URL (``s3://bucket/prefix``).

    ``cache``: where a store-backed registry's versions are copied to be read (default
    ``MODEL_CACHE``); unused by a local one.
    """

    def __init__(self, root: Path | str | None = None, *, cache: Path | str | None = None) -> None:
        location = root if root is not None else default_registry()
        self.store = Store(location)
        self.remote = self.store.remote
        #: a folder's ``Path``, or the store's URL
        self.root: Path | str = self.store.url if self.remote else Path(location)
        self._cache = Path(cache) if cache is not None else None

    # -- where things are ---------------------------------------------------------
    @property
    def cache_root(self) -> Path:
        """This registry's folder in the local cache (``MODEL_CACHE/<registry>``)."""
        return (self._cache or default_cache()) / cache_slug(self.store.url)

    def local_dir(self, version: str) -> Path:
        """The version's local, writable folder: for a local registry the version's own folder;
        for a store, its cache folder (created), which holds the version's files once loaded.
        Consumers may keep files of their own there (on a store they stay on this machine)."""
        self._check_id(version)
        if not self.remote:
            return Path(self.root) / version
        folder = self.cache_root / version
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def runs_dir(self) -> Path:
        """Interrupted training runs (resumable): in the registry's folder, or in the local cache."""
        return (self.cache_root if self.remote else Path(self.root)) / RUNS

    # -- reading -----------------------------------------------------------------
    def versions(self) -> list[str]:
        """All complete versions, oldest first."""
        names = (name.split("/", 1)[0] for name in self.store.glob(f"*/{METADATA}"))
        return sorted(n for n in names if n and not n.startswith("."))

    @staticmethod
    def _check_id(version: str) -> None:
        # Longer than a file name can be (255 bytes): no such folder, and asking the OS would raise.
        if not version or "/" in version or version.startswith(".") or len(version.encode("utf-8", "replace")) > 255:
            shown = version if len(version) <= 80 else f"{version[:80]}... ({len(version)} characters)"
            raise UserError(f"invalid version id {shown!r}")

    def path(self, version: str) -> Path:
        """The version's local folder (:meth:`local_dir`), once it is known to exist."""
        self._check_id(version)
        if not self.store.exists(f"{version}/{METADATA}"):
            known = ", ".join(self.versions()[-5:]) or "none"
            raise UserError(f"unknown version {version!r} in registry {self.root} (newest known: {known})")
        return self.local_dir(version)

    def promoted(self) -> str | None:
        try:
            version = self.store.read_bytes(PROMOTED).decode().strip()
        except FileNotFoundError:
            return None
        return version or None

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def resolve(self, version: str | None = None) -> str:
        """``None``/"default" -> the promoted version, else the newest; "latest" -> newest."""
        if version in (None, "", "default"):
            version = self.promoted() or self.latest()
        elif version == "latest":
            version = self.latest()
        elif version == "promoted":
            version = self.promoted()
            if version is None:
                raise UserError(f"no version is promoted in registry {self.root}")
        if version is None:
            raise UserError(
                f"registry {self.root} holds no model yet: train one with `python -m training train --data SRC`"
            )
        self.path(version)
        return version

    def _read_json(self, version: str, name: str) -> Any:
        try:
            raw = self.store.read_bytes(f"{version}/{name}")
        except FileNotFoundError:
            raise UserError(f"missing file: {self.root}/{version}/{name}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.root}/{version}/{name} is not valid JSON: {exc}") from None

    def metadata(self, version: str) -> dict[str, Any]:
        self.path(version)
        return self._read_json(version, METADATA)

    def history(self, version: str) -> list[dict[str, Any]]:
        self.path(version)
        try:
            return self._read_json(version, HISTORY)
        except UserError:
            if self.store.exists(f"{version}/{HISTORY}"):
                raise
            return []

    def metrics(self, version: str) -> dict[str, Any] | None:
        """The version's ``metrics.json`` (after ``evaluate``), None before."""
        self.path(version)
        if not self.store.exists(f"{version}/{METRICS}"):
            return None
        return self._read_json(version, METRICS)

    def load(self, version: str | None = None, device: str | torch.device = "cpu") -> LoadedVersion:
        """Build the model from metadata and load its weights: same code for every consumer.
        The files read are checked against the sha256 recorded in the metadata first."""
        try:
            version = self.resolve(version)
            meta = self._read_json(version, METADATA)
            # A store's files are checked as they are fetched; a folder's once they have loaded (so that
            # a missing, truncated or misfit file is refused with the error that names what is wrong).
            path = self._fetched(version, meta) if self.remote else self.local_dir(version)
        except StoreUnavailable as exc:
            cached = self._cached(version)
            if cached is None:
                raise
            log.warning("%s; loading version %s from the local cache %s", exc, version, cached[1])
            meta, path = cached
        net = build_model(len(meta["class_names"]), arch=meta["architecture"])
        try:
            state = load_file(str(path / WEIGHTS))
        except FileNotFoundError:
            raise UserError(f"version {version}: weights file {path / WEIGHTS} is missing") from None
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"version {version}: cannot read {path / WEIGHTS}: {exc}") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"version {version}: weights do not fit the architecture: {exc}") from None
        if not self.remote:
            for name, record in (meta.get("files") or {}).items():
                if name in CORE_FILES and (path / name).is_file():
                    refuse_if_differs(version, path / name, record, where=str(path / name))
        pre = Preprocess(meta["input_size"], meta["normalization"]["mean"], meta["normalization"]["std"])
        model = Classifier(net, pre).eval().to(device)
        return LoadedVersion(version=version, path=path, metadata=meta, model=model)

    def _cached(self, version: str | None) -> tuple[dict[str, Any], Path] | None:
        """A store's version complete in the local cache: loadable while the store cannot be
        reached, since a version never changes. None for a name like "default", or an incomplete copy."""
        if not self.remote or not version or version in ("default", "latest", "promoted"):
            return None
        self._check_id(version)
        folder = self.cache_root / version
        meta = cached_complete(folder, CORE_FILES)
        return (meta, folder) if meta is not None else None

    def _fetched(self, version: str, meta: dict[str, Any]) -> Path:
        """The cache folder of ``version``, its files fetched and checked (:func:`fetch_checked`)."""
        folder = self.local_dir(version)
        fetch_checked(self.store, version, meta, folder, CORE_FILES)
        return folder

    # -- writing -----------------------------------------------------------------
    def _writable_root(self) -> None:
        if self.remote:
            probe = f"{INCOMING}/probe-{secrets.token_hex(4)}"
            try:
                self.store.write_bytes(probe, b"")
                self.store.remove(probe)
            except UserError as exc:
                raise UserError(f"registry {self.root} is not writable: {exc}") from None
            return
        root = Path(self.root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / INCOMING).mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root / INCOMING):
                pass
        except OSError as exc:
            raise UserError(f"registry {self.root} is not writable: {exc.strerror or exc}") from None

    def check_writable(self) -> None:
        """Fail early (before hours of training) when the registry cannot be written."""
        self._writable_root()

    def publish(
        self,
        version: str,
        net: torch.nn.Module,
        metadata: dict[str, Any],
        background: torch.Tensor,
        history: list[dict[str, Any]],
        validation_sample: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Path:
        """Write a complete version, its metadata (with every file's sha256) last, and return its
        local folder. A folder is staged under ``.incoming/`` and renamed into place; on a store
        the files are uploaded, then the metadata that makes the version visible."""
        self._check_id(version)
        self._writable_root()
        stage_in = Path(self.root) / INCOMING if not self.remote else self.cache_root / INCOMING
        stage_in.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=stage_in, prefix=f"{version}."))
        try:
            state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(staging / WEIGHTS), metadata={"version": version})
            save_file({"images": background.to(torch.uint8).contiguous()}, str(staging / BACKGROUND))
            if validation_sample is not None:
                images, labels = validation_sample
                tensors = {"images": images.to(torch.uint8).contiguous(), "labels": labels.to(torch.int64).contiguous()}
                save_file(tensors, str(staging / VALIDATION_SAMPLE))
            write_json_atomic(staging / HISTORY, history)
            files = {p.name: file_record(p) for p in sorted(staging.iterdir()) if not p.name.startswith(".")}
            write_json_atomic(staging / METADATA, {**metadata, "files": files})
            if self.store.exists(f"{version}/{METADATA}"):
                raise UserError(f"version {version} already exists in {self.root}")
            if not self.remote:
                final = Path(self.root) / version
                if final.exists():
                    raise UserError(f"version {version} already exists in {self.root}")
                os.rename(staging, final)
                return final
            for name in files:
                self.store.upload(staging / name, f"{version}/{name}")
            self.store.upload(staging / METADATA, f"{version}/{METADATA}")
            final = self.cache_root / version  # the writer's copy is the cache's first
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            return final
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def attach(self, version: str, *names: str) -> None:
        """Add files written into :meth:`local_dir` after publishing (metrics, plots, the report,
        the explainer) to the version: uploaded to a store, and recorded in its metadata with
        their sha256. A file is replaced at once (a rename, one PUT); so is the metadata."""
        folder = self.path(version)
        meta = self._read_json(version, METADATA)
        files = dict(meta.get("files") or {})
        for name in names:
            if self.remote:
                self.store.upload(folder / name, f"{version}/{name}")
            files[name] = file_record(folder / name)
        meta["files"] = files
        data = (json.dumps(meta, indent=2) + "\n").encode()
        self.store.write_bytes(f"{version}/{METADATA}", data)
        if self.remote:
            (folder / METADATA).write_bytes(data)

    def write_metrics(self, version: str, metrics: dict[str, Any]) -> Path:
        path = self.path(version) / METRICS
        write_json_atomic(path, metrics)
        self.attach(version, METRICS)
        return path

    def promote(self, version: str) -> None:
        version = self.resolve(version)
        self._writable_root()
        self.store.write_bytes(PROMOTED, (version + "\n").encode())
