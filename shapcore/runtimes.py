"""The runtime candidates the gate (:mod:`shapcore.gate`) measures against the fp32 TorchScript baseline.

=================  =========  =======================================================================
name               precision  what runs
=================  =========  =======================================================================
``torchscript``    fp32       the baseline: the TorchScript-frozen network (eager on CUDA)
``bf16``           bf16       the eager network under bf16 autocast (native bf16 hardware only)
``compile``        fp32       ``torch.compile`` of the eager network (Inductor; compiled per batch shape)
``onnxruntime``    fp32       the ONNX export in ONNX Runtime (graph fusions, its own kernels)
``openvino``       fp32       the ONNX export in OpenVINO (inference precision pinned to f32)
``int8``           int8       the export quantised after training (static, QDQ), in ONNX Runtime
``openvino-int8``  int8       the same quantised model in OpenVINO
=================  =========  =======================================================================

ONNX Runtime and OpenVINO are an optional extra (``pip install shapserve[runtimes]``): without
them their candidates are skipped, with the reason. They run on the CPU only. Their sessions are
made in the process that calls them (after a fork, a work horse makes its own, with its own
thread count) and are safe to call from several threads. OpenVINO's are not fork-safe even so
(:data:`FORK_UNSAFE`): a forking worker leaves them out.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from shapcore.exports import (
    EXPORT_REVISION,
    INT8_SCHEME,
    ONNX_FP32,
    ONNX_INT8,
    cache_dirs,
    cached,
    cpu_has_vnni,
    export_onnx,
    library_version,
    quantize_int8,
    tensor_sha256,
)
from shapcore.gate import Candidate, ForwardFn, Unavailable
from shapcore.model import Classifier
from shapcore.precision import native_bf16
from shapcore.registry import WEIGHTS
from shapcore.settings import RuntimeName
from shapcore.store import sha256_file

log = logging.getLogger(__name__)

BASELINE = "torchscript"
#: Candidates whose library leaves threads behind in the process that ran them (OpenVINO's TBB
#: arena): a child forked afterwards aborts ("std::system_error: No such process", measured with
#: RQ's forked work horses). A forking worker neither measures nor runs them.
FORK_UNSAFE = frozenset({"openvino", "openvino-int8"})
#: Every name ``RUNTIME`` / ``EXPLAIN_RUNTIME`` takes besides ``auto`` (declared, torch-free, with the settings).
RUNTIMES: tuple[str, ...] = tuple(n for n in get_args(RuntimeName) if n != "auto")


#: Inductor compiles each batch shape for minutes on a 2-core CPU (110 s for batch 1 of the 32-px ResNet-50,
#: a loaded machine, 2026-12-07): too long for every start. Measured by bench/runtimes.py instead.
COMPILE_NOT_IN_AUTO = "measured only when named (RUNTIME=compile): Inductor compiles each batch shape for minutes"


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images as they are (what the exports take)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class _PerProcess:
    """A session made on first use in each process (a forked child makes its own), with the
    intra-op thread count torch has there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pid: int | None = None
        self._session: Any = None
        self._lock = threading.Lock()

    def session(self) -> Any:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._session = self.open(max(1, torch.get_num_threads()))
                    self._pid = os.getpid()
        return self._session

    def open(self, threads: int) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


class OnnxRuntimeForm(_PerProcess):
    """An ONNX file run by ONNX Runtime on the CPU: images -> logits (torch tensors)."""

    def open(self, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = as_unit_float(images).contiguous().numpy()
        return torch.from_numpy(self.session().run(None, {"images": x})[0])


class OpenVinoForm(_PerProcess):
    """An ONNX file compiled by OpenVINO for the CPU at f32 inference precision (it would pick bf16
    on AMX CPUs otherwise): images -> logits. One infer request per calling thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._local = threading.local()

    def open(self, threads: int) -> Any:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        return core.compile_model(core.read_model(str(self.path)), "CPU", config)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        compiled = self.session()
        if getattr(self._local, "owner", None) is not compiled:
            self._local.request, self._local.owner = compiled.create_infer_request(), compiled
        x = as_unit_float(images).contiguous().numpy()
        out = self._local.request.infer({0: x})
        return torch.from_numpy(next(iter(out.values())).copy())


@dataclass
class ExportSource:
    """What a version's exports are made from and where they are kept (:mod:`shapcore.exports`).

    ``model``: the classifier (float images in [0, 1] or uint8 -> logits); ``calibration``: the
    validation sample as float images in [0, 1] (int8 calibration); ``cache_root``: the local
    cache used where the version's folder is read-only (``RUNTIME_CACHE_DIR``)."""

    model: Classifier
    version_path: Path
    calibration: Callable[[], torch.Tensor]
    cache_root: Path
    _memo: dict[str, Path] = field(default_factory=dict)
    _weights_sha256: str | None = None

    def dirs(self) -> list[Path]:
        return cache_dirs(self.version_path, self.cache_root)

    def base_inputs(self) -> dict[str, Any]:
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_file(self.version_path / WEIGHTS)
        return {"revision": EXPORT_REVISION, "weights_sha256": self._weights_sha256,
                "torch": torch.__version__, "onnx": library_version("onnx")}  # fmt: skip

    def onnx_fp32(self) -> Path:
        if ONNX_FP32 not in self._memo:
            _require("onnx")
            self._memo[ONNX_FP32] = cached(ONNX_FP32, self.base_inputs(),
                                           lambda p: export_onnx(self.model, p), self.dirs())  # fmt: skip
        return self._memo[ONNX_FP32]

    def onnx_int8(self) -> Path:
        if ONNX_INT8 not in self._memo:
            _require("onnxruntime")
            fp32 = self.onnx_fp32()
            reduce_range = not cpu_has_vnni()
            calibration = self.calibration()
            inputs = {**self.base_inputs(), "onnxruntime": library_version("onnxruntime"),
                      "calibration_sha256": tensor_sha256(calibration), "reduce_range": reduce_range,
                      "scheme": INT8_SCHEME}  # fmt: skip
            self._memo[ONNX_INT8] = cached(
                ONNX_INT8, inputs, lambda p: quantize_int8(fp32, calibration, p, reduce_range=reduce_range),
                self.dirs(),
            )
        return self._memo[ONNX_INT8]


def _require(package: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise Unavailable(f"{package} is not installed (the `runtimes` extra: pip install 'shapserve[runtimes]')") \
            from None


def _built(path: Callable[[], Path]) -> Path:
    try:
        return path()
    except OSError as exc:  # neither the version's folder nor the local cache can take the export
        raise Unavailable(f"its export cannot be written: {exc}") from None


def candidates(
    source: ExportSource,
    device: torch.device,
    eager: nn.Module,
    *,
    wrap: Callable[[str, ForwardFn], ForwardFn],
    bf16: Callable[[], ForwardFn],
) -> list[Candidate]:
    """The candidates for one version on ``device``. ``eager``: the fp32 eager network (batch norms
    folded) the compiled form starts from; ``wrap(name, core)``: the caller's form around a core
    (images -> logits), e.g. the serving path's softmax and batching; ``bf16``: builds the caller's
    bf16 form."""

    def on_cpu(name: str) -> None:
        if device.type != "cpu":
            raise Unavailable(f"{name} runs on the CPU here; this process runs on {device}")

    def bf16_form() -> ForwardFn:
        if not native_bf16(device):
            raise Unavailable(f"no native bf16 on this {device.type}")
        return bf16()

    def compiled() -> ForwardFn:
        if os.name == "nt":  # pragma: no cover
            raise Unavailable("torch.compile's CPU backend needs a C++ compiler")
        net = copy.deepcopy(eager).eval()
        return wrap("compile", torch.compile(net, dynamic=False))

    def ort(path: Callable[[], Path], name: str) -> Callable[[], ForwardFn]:
        def build() -> ForwardFn:
            on_cpu(name)
            _require("onnxruntime")
            return wrap(name, OnnxRuntimeForm(_built(path)))

        return build

    def openvino(path: Callable[[], Path], name: str) -> Callable[[], ForwardFn]:
        def build() -> ForwardFn:
            on_cpu(name)
            _require("openvino")
            return wrap(name, OpenVinoForm(_built(path)))

        return build

    return [
        Candidate("bf16", "bf16", bf16_form),
        Candidate("compile", "fp32", compiled, not_in_auto=COMPILE_NOT_IN_AUTO),
        Candidate("onnxruntime", "fp32", ort(source.onnx_fp32, "onnxruntime")),
        Candidate("openvino", "fp32", openvino(source.onnx_fp32, "openvino")),
        Candidate("int8", "int8", ort(source.onnx_int8, "int8")),
        Candidate("openvino-int8", "int8", openvino(source.onnx_int8, "openvino-int8")),
    ]
