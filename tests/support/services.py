"""Fixtures that run the real service: ``python -m service`` under uvicorn in a subprocess.

Registered by tests/conftest.py, so every test module can use them:

``service_registry``  (session) a private copy of the ``smoke_model`` registry whose version
                      has been evaluated (metrics.json + confusion_matrix.png), so /model
                      and the evaluation gauges have something to show.
``start_service``     (session) factory: ``start_service(registry=None, env=None, wait="ready",
                      port=None)`` starts ``python -m service`` on ``port`` (default: a free
                      one; a given one restarts a replica where a balancer expects it) with ``env`` overriding
                      the defaults below, waits until /readyz answers 200 (``wait="alive"``:
                      until /healthz answers; ``wait=None``: not at all) and returns a
                      :class:`RunningService`. Every service started is stopped when the
                      session ends (or earlier with ``.stop()``).
``own_service``       (function) the same factory for one test: what it starts is stopped
                      when the test ends (use it, or a fixture of the test's scope that
                      stops what it starts, for every service a single test needs).
``service``           (session) one shared instance over ``service_registry`` with default
                      settings. Don't switch its model; start your own for that.
``odd_images``        (session) {name: (filename, bytes, mime type)}: the real CIFAR JPEG as
                      greyscale PNG, palette PNG, RGBA PNG, 16-bit PNG, CMYK JPEG, animated GIF,
                      EXIF-rotated JPEG, WebP, BMP and TIFF (see :func:`make_odd_images`).

Defaults passed to the subprocess: ``MODEL_REGISTRY`` (the given registry, else
``service_registry``), ``HOST=127.0.0.1``, ``PORT`` (free), ``REDIS_URL`` (the test Redis
database), ``TORCH_THREADS=1`` and ``DECODE_THREADS=1`` (the suite shares a small machine),
``LOG_LEVEL=info``. Example::

    def test_something(start_service, service_registry):
        svc = start_service(env={"BATCHING": "false", "MAX_UPLOAD_BYTES": "1000"})
        r = svc.client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")})
        assert r.status_code == 413, svc.log_tail()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT, RunningProcess, child_env, free_port, python_module, spawn

__all__ = ["ROOT", "RunningProcess", "free_port"]  # re-exported for the tests that import them from here

STARTUP_TIMEOUT_S = float(os.environ.get("SHAPSERVE_TEST_STARTUP_TIMEOUT", "180"))


class MissingSample(LookupError):
    """A sample a check reads is not in the exposition at all (renamed, unregistered, never set)."""


def metric(text: str, sample_name: str, /, **labels: str) -> float:
    """Value of one sample in a Prometheus exposition; :class:`MissingSample` if it is absent.

    Absence is an error, never a zero: a check such as ``>= 0`` or ``== 0.0`` must not pass
    because the metric vanished. Where a sample may legitimately not exist yet (a labelled
    counter before its first increment), use :func:`metric_or`.
    """
    value = metric_or(text, sample_name, None, **labels)
    if value is None:
        raise MissingSample(f"no sample {sample_name}{labels or ''} in the exposition")
    return value


def metric_or(text: str, sample_name: str, default: float | None, /, **labels: str) -> float | None:
    """Value of one sample in a Prometheus exposition, or ``default`` if it is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return default


def image_file(data: bytes, name: str = "cat.jpg", mime: str = "image/jpeg") -> dict:
    """httpx ``files=`` for one upload in field ``file``."""
    return {"file": (name, data, mime)}


def clone_version(registry: Path, version: str, new_id: str, *, swap_classes: tuple[int, int] | None = None) -> str:
    """Copy a version's folder under another id (a second servable version, or one to damage).

    ``swap_classes=(i, j)``: the copy gets *different weights*: rows ``i`` and ``j`` of the last
    Linear layer (weight and bias) are exchanged, so for every image the copy's probability of
    class ``i`` is the original's of class ``j`` and vice versa (see :func:`swapped`). A swap
    that relabels but keeps serving the old weights is then visible in the probabilities.
    """
    dest = registry / new_id
    shutil.copytree(registry / version, dest)
    meta = json.loads((dest / "metadata.json").read_text())
    meta["version"] = new_id
    if swap_classes is not None:
        from safetensors.torch import load_file, save_file

        weights = dest / "model.safetensors"
        state = load_file(str(weights))
        i, j = swap_classes
        for key in (f"{LAST_LINEAR}.weight", f"{LAST_LINEAR}.bias"):
            tensor = state[key].clone()
            tensor[[i, j]] = tensor[[j, i]]
            state[key] = tensor.contiguous()
        save_file(state, str(weights))
        if "files" in meta:  # a new version's weights, recorded as publishing records them
            from shapcore.store import file_record

            meta["files"]["model.safetensors"] = file_record(weights)
    (dest / "metadata.json").write_text(json.dumps(meta))
    return new_id


#: The state-dict prefix of the classifier's last Linear layer (``fc`` = Dropout + Linear).
LAST_LINEAR = "fc.1"


def swapped(probabilities: list[float], swap_classes: tuple[int, int]) -> list[float]:
    """The per-class probabilities a :func:`clone_version` copy with ``swap_classes`` gives."""
    i, j = swap_classes
    out = list(probabilities)
    out[i], out[j] = probabilities[j], probabilities[i]
    return out


def class_probabilities(body: dict, num_classes: int = 10) -> list[float]:
    """A /predict answer asked with ``top_k=num_classes`` as probabilities indexed by class."""
    out = [float("nan")] * num_classes
    for p in body["predictions"]:
        out[p["index"]] = p["probability"]
    return out


@dataclass
class RunningService(RunningProcess):
    """A ``python -m service`` subprocess and an httpx client bound to it."""

    url: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60.0)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the service process, in KiB (Linux)."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def wait(self, until: str = "ready", timeout: float = STARTUP_TIMEOUT_S) -> None:
        path = "/readyz" if until == "ready" else "/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.client.get(path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not {until} after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.client.close()
        self.terminate(signal.SIGINT, timeout=15)


def make_odd_images(jpeg: bytes) -> dict[str, tuple[str, bytes, str]]:
    """The same picture in every mode and format the service must convert properly."""
    import io

    import numpy as np
    from PIL import Image

    src = Image.open(io.BytesIO(jpeg)).convert("RGB")

    def save(image: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()

    rgba = np.asarray(src.convert("RGBA")).copy()
    rgba[..., 3] = 160
    grey16 = np.asarray(src.convert("L")).astype(np.uint16) * 257
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = src.resize((48, 32)).transpose(Image.Transpose.ROTATE_90)  # stored sideways, 32x48
    return {
        "greyscale_png": ("grey.png", save(src.convert("L"), "PNG"), "image/png"),
        "palette_png": ("palette.png", save(src.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
        "rgba_png": ("rgba.png", save(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png"),
        "16bit_png": ("grey16.png", save(Image.fromarray(grey16), "PNG"), "image/png"),
        "cmyk_jpeg": ("cmyk.jpg", save(src.convert("CMYK"), "JPEG", quality=95), "image/jpeg"),
        "animated_gif": (
            "anim.gif",
            save(src, "GIF", save_all=True, append_images=[src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], loop=0),
            "image/gif",
        ),
        "exif_rotated_jpeg": ("rotated.jpg", save(rotated, "JPEG", quality=95, exif=exif), "image/jpeg"),
        "webp": ("cat.webp", save(src, "WEBP", lossless=True), "image/webp"),
        "bmp": ("cat.bmp", save(src, "BMP"), "image/bmp"),
        "tiff": ("cat.tiff", save(src, "TIFF"), "image/tiff"),
    }


@pytest.fixture(scope="session")
def odd_images(cifar_jpeg: bytes) -> dict[str, tuple[str, bytes, str]]:
    return make_odd_images(cifar_jpeg)


@pytest.fixture(scope="session")
def service_registry(
    smoke_model: tuple[Path, str], small_test_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the smoke registry whose (promoted) version has metrics.json and confusion_matrix.png."""
    from shapcore.registry import Registry
    from training import evaluate

    src, version = smoke_model
    dest = tmp_path_factory.mktemp("service") / "registry"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".runs", ".incoming"))
    evaluate.run(Registry(dest), version, str(small_test_archive), progress=False)
    return dest


@pytest.fixture(scope="session")
def start_service(
    service_registry: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Callable[..., RunningService]]:
    started: list[RunningService] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(
        registry: Path | None = None,
        env: dict[str, str] | None = None,
        wait: str | None = "ready",
        port: int | None = None,
    ) -> RunningService:
        port = port or free_port()
        full_env = child_env(**{
            "MODEL_REGISTRY": str(registry or service_registry),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "REDIS_URL": redis_url,
            "TORCH_THREADS": "1",
            "DECODE_THREADS": "1",
            "LOG_LEVEL": "info",
            # the tests compare answers with fp32 references; auto times the runtimes at load,
            # which a loaded machine tips either way (tests/shapcore/test_runtime_gate.py tests the gate)
            "RUNTIME": "torchscript",
            **(env or {}),
        })
        log_path = logs / f"service-{port}.log"
        proc = spawn(python_module("service"), full_env, log_path)
        svc = RunningService(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, env=full_env)
        started.append(svc)
        if wait:
            svc.wait(wait)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture
def own_service(start_service: Callable[..., RunningService]) -> Iterator[Callable[..., RunningService]]:
    """``start_service`` for one test: every service it starts is stopped when the test ends."""
    started: list[RunningService] = []

    def start(*args, **kwargs) -> RunningService:
        svc = start_service(*args, **kwargs)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """The shared service over ``service_registry``, default settings, ready."""
    return start_service()
