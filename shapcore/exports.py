"""Exported and quantised forms of a version, built once and cached beside it.

ONNX Runtime and OpenVINO run an ONNX export of the classifier (its preprocessing included:
float images in [0, 1] -> logits, any batch size), and the int8 candidates run that export
quantised after training (ONNX Runtime's static quantiser, QDQ format, calibrated on the
version's stored validation sample). Building them costs seconds to minutes, so each is
built **once per version** and kept in the version's folder under ``runtimes/``, with a
record (``<file>.json``) of the file's sha256 and of the inputs it came from: the weights'
sha256, the library versions, the calibration sample's hash. A file whose record does not
match (another checkpoint, a library upgrade, a truncated or altered file) is rebuilt, and the
log says why. Where the registry is read-only the files go to a local cache folder
(``RUNTIME_CACHE_DIR``): :func:`cache_dirs` is the one place that decides where, so a registry
kept elsewhere (object storage with a local copy) redirects it there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import torch

from shapcore.model import SOURCE_SIZE, Classifier
from shapcore.store import atomic_target, sha256_file

log = logging.getLogger(__name__)

#: Sub-folder of a version (or of the local cache, per version) holding its exports.
CACHE_SUBDIR = "runtimes"
#: Bumped when the way an export is made changes: older files are then rebuilt.
EXPORT_REVISION = 1
ONNX_FP32 = "model-fp32.onnx"
ONNX_INT8 = "model-int8.onnx"


def library_version(name: str) -> str | None:
    try:
        return pkg_metadata.version(name)
    except pkg_metadata.PackageNotFoundError:
        return None


def cache_dirs(version_path: Path, fallback_root: Path) -> list[Path]:
    """Where a version's exports may be, in the order they are looked for: the version's own
    folder, then the local cache's folder for it. The first writable one receives a new build."""
    return [version_path / CACHE_SUBDIR, fallback_root / version_path.name / CACHE_SUBDIR]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _valid(path: Path, inputs: dict[str, Any]) -> str | None:
    """None when ``path`` and its record hold what ``inputs`` asks for; else why not."""
    record_path = _record_path(path)
    if not record_path.is_file():
        return "no record"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable record ({exc})"
    if record.get("inputs") != inputs:
        changed = sorted(k for k in {*inputs, *record.get("inputs", {})} if inputs.get(k) != record["inputs"].get(k))
        return f"made from other inputs ({', '.join(changed)})"
    if not path.is_file():
        return "file missing"
    if sha256_file(path) != record.get("sha256"):
        return "its sha256 does not match its record"
    return ""


def cached(filename: str, inputs: dict[str, Any], build: Callable[[Path], None], dirs: list[Path]) -> Path:
    """The file ``filename`` made from ``inputs``: a valid cached copy from ``dirs``, else built by
    ``build(path)`` into the first writable of ``dirs`` and recorded (file hash and inputs)."""
    reasons = []
    for folder in dirs:
        path = folder / filename
        if not _record_path(path).exists() and not path.exists():
            continue
        why = _valid(path, inputs)
        if not why:
            return path
        reasons.append(f"{path}: {why}")
    target = next((d for d in dirs if _writable(d)), None)
    if target is None:
        raise OSError(f"no writable folder for {filename} among {', '.join(map(str, dirs))}")
    if reasons:
        log.warning("rebuilding %s: %s", filename, "; ".join(reasons))
    else:
        log.info("building %s into %s (once for this version)", filename, target)
    final = target / filename
    with atomic_target(final) as tmp:
        build(tmp)
        record = {"file": filename, "sha256": sha256_file(tmp), "inputs": inputs}
    _record_path(final).write_text(json.dumps(record, indent=2) + "\n")
    return final


def export_onnx(model: Classifier, path: Path) -> None:
    """``model`` (float images in [0, 1] -> logits) as ONNX, any batch size, at ``path``."""
    clone = copy.deepcopy(model).cpu().eval().float()
    example = torch.zeros(1, 3, SOURCE_SIZE, SOURCE_SIZE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on the preprocess' size check
        torch.onnx.export(clone, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)  # fmt: skip


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 without overflow (VNNI / AMX-INT8). On plain AVX2 the
    u8s8 kernels sum pairs in 16 bits and can saturate: weights are then quantised to 7 bits."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


#: How :func:`quantize_int8` quantises (recorded with its file: a change rebuilds it).
INT8_SCHEME = "static QDQ, u8 activations, s8 per-channel weights, MinMax; first conv and classifier head in fp32"


def quantize_int8(fp32_path: Path, calibration: torch.Tensor, path: Path, *, reduce_range: bool) -> None:
    """Static int8 quantisation of the ONNX model at ``fp32_path`` (QDQ, per-channel weights),
    its activation ranges calibrated on ``calibration`` (float images in [0, 1]). The first
    convolution (it sees the raw pixels) and the classifier head stay in fp32: cheap at this size,
    and on the 32-px ``cpu`` model they were a third of the flipped answers (top-1 agreement with
    fp32 98.5 % -> 99.0 % on its 600-image validation sample, 2026-12-07)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[torch.Tensor] = iter(calibration.split(50))

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.contiguous().numpy()}

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        nodes = onnx.load(str(prepared), load_external_data=False).graph.node
        first_conv = next((n.name for n in nodes if n.op_type == "Conv"), None)
        head = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        nodes_to_exclude=[n for n in (first_conv, *head) if n])  # fmt: skip


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()
