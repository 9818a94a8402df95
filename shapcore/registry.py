"""The checkpoint registry: one immutable folder per version, written atomically.

Layout of ``<registry>/<version>/``:

- ``model.safetensors``      the network's weights (no pickle anywhere)
- ``metadata.json``          architecture, classes, preprocessing, hyper-parameters, data, ...
- ``background.safetensors`` uint8 (N, 3, 32, 32) training images for the explainer
- ``history.json``           per-epoch training/validation curves
- ``metrics.json``, ``confusion_matrix.png``, ``training_curves.png``  after ``evaluate``

``<registry>/PROMOTED`` names the version served by default. A version is first written
under ``<registry>/.incoming/`` and then renamed into place, so a crash mid-write leaves
no half version visible. Ids sort by creation time: ``YYYYMMDD-HHMMSS-xxxxxx``.
"""

from __future__ import annotations

import json
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

WEIGHTS = "model.safetensors"
METADATA = "metadata.json"
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


def default_registry() -> Path:
    """``MODEL_REGISTRY`` (:class:`shapcore.settings.SharedSettings`): where a ``Registry()`` given no root reads."""
    return SharedSettings().model_registry


def new_version_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename it over: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry()

    # -- reading -----------------------------------------------------------------
    def versions(self) -> list[str]:
        """All complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / METADATA).is_file()
        )

    def path(self, version: str) -> Path:
        # Longer than a file name can be (255 bytes): no such folder, and asking the OS would raise.
        if not version or "/" in version or version.startswith(".") or len(version.encode("utf-8", "replace")) > 255:
            shown = version if len(version) <= 80 else f"{version[:80]}... ({len(version)} characters)"
            raise UserError(f"invalid version id {shown!r}")
        path = self.root / version
        if not (path / METADATA).is_file():
            known = ", ".join(self.versions()[-5:]) or "none"
            raise UserError(f"unknown version {version!r} in registry {self.root} (newest known: {known})")
        return path

    def promoted(self) -> str | None:
        try:
            version = (self.root / PROMOTED).read_text().strip()
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

    def metadata(self, version: str) -> dict[str, Any]:
        return read_json(self.path(version) / METADATA)

    def history(self, version: str) -> list[dict[str, Any]]:
        path = self.path(version) / HISTORY
        return read_json(path) if path.exists() else []

    def load(self, version: str | None = None, device: str | torch.device = "cpu") -> LoadedVersion:
        """Build the model from metadata and load its weights: same code for every consumer."""
        version = self.resolve(version)
        path = self.path(version)
        meta = read_json(path / METADATA)
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
        pre = Preprocess(meta["input_size"], meta["normalization"]["mean"], meta["normalization"]["std"])
        model = Classifier(net, pre).eval().to(device)
        return LoadedVersion(version=version, path=path, metadata=meta, model=model)

    # -- writing -----------------------------------------------------------------
    def _writable_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / INCOMING).mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root / INCOMING):
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
        """Write a complete version folder, then make it visible with one rename."""
        self._writable_root()
        staging = Path(tempfile.mkdtemp(dir=self.root / INCOMING, prefix=f"{version}."))
        try:
            state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(staging / WEIGHTS), metadata={"version": version})
            save_file({"images": background.to(torch.uint8).contiguous()}, str(staging / BACKGROUND))
            if validation_sample is not None:
                images, labels = validation_sample
                tensors = {"images": images.to(torch.uint8).contiguous(), "labels": labels.to(torch.int64).contiguous()}
                save_file(tensors, str(staging / VALIDATION_SAMPLE))
            write_json_atomic(staging / HISTORY, history)
            write_json_atomic(staging / METADATA, metadata)
            final = self.root / version
            if final.exists():
                raise UserError(f"version {version} already exists in {self.root}")
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def write_metrics(self, version: str, metrics: dict[str, Any]) -> Path:
        path = self.path(version) / METRICS
        write_json_atomic(path, metrics)
        return path

    def promote(self, version: str) -> None:
        version = self.resolve(version)
        self._writable_root()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{PROMOTED}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(version + "\n")
        os.replace(tmp, self.root / PROMOTED)

    def runs_dir(self) -> Path:
        return self.root / RUNS
