"""Inference-time forms of a trained network, shared by the service and the worker, and the
device they run on.

BatchNorm folding and TorchScript freezing change how fast a forward pass runs, never what it
computes (beyond float rounding); the service and the worker must agree on both, so they live
here: :func:`prepare_for_explaining` (the worker's value function) and :class:`Forward` (the
API's batched /predict, :func:`build_forward` and :func:`warm_up`). :class:`shapcore.host.ModelHost`
loads a version into one of them.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
from torch import nn

from shapcore.errors import UserError
from shapcore.model import SOURCE_SIZE, Classifier

log = logging.getLogger(__name__)


def resolve_device(preference: str, *, setting: str = "DEVICE") -> torch.device:
    """The device a ``DEVICE`` (API), ``EXPLAIN_DEVICE`` (worker) or ``--device`` (training) preference names:
    the one device resolver of the project.

    ``auto``: CUDA when torch sees a device, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``: that
    device, or a :class:`UserError` naming ``setting`` when torch sees none (or fewer than N + 1).
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise UserError(f"{setting}={preference!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{setting}={preference} but no CUDA device is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{setting}={preference} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"{setting}={preference!r} is not a device (auto, cpu, cuda or cuda:N)")
    return device


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d into it (eval mode only).

    Same function, one layer less per block: fewer memory passes on CPU. Works on the
    torchvision ResNet layout (convN/bnN attributes and ``downsample = Sequential(conv, bn)``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and name.startswith("bn"):
                conv = getattr(module, "conv" + name[2:], None)
                if isinstance(conv, nn.Conv2d):
                    setattr(module, "conv" + name[2:], fuse_conv_bn_eval(conv, child))
                    setattr(module, name, nn.Identity())
        if isinstance(module, nn.Sequential) and len(module) == 2:
            conv, bn = module[0], module[1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[0] = fuse_conv_bn_eval(conv, bn)
                module[1] = nn.Identity()
    return net


def prepare_for_explaining(model: nn.Module, *, jit: bool = True) -> tuple[nn.Module, nn.Module]:
    """The classifier as the explainers evaluate it: batch norms folded into the convolutions
    (:func:`fold_batch_norms`; outputs equal to ~1e-7), channels-last weights, no weight
    gradients; with ``jit`` on the CPU, traced, frozen and optimised for inference as the
    service's batched path is (:func:`freeze_for_inference`): 1.5x the eager images/s at batch
    256 on a 2-core CPU. On CUDA the eager network is kept, as the service does: freezing's
    measured gain is oneDNN's weight pre-packing, a CPU thing.

    Modifies ``model`` in place. Returns (the network to evaluate, the eager one): the eager one
    keeps autograd through it, what Captum's gradient methods need (a frozen graph has none).
    Used by the worker (every method) and by the amortised explainer's fit, which must value
    coalitions exactly as KernelSHAP does.
    """
    model.net = fold_batch_norms(model.net)
    model.eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = None
    if jit and next(model.parameters()).device.type == "cpu":
        frozen = freeze_for_inference(model, torch.zeros(1, 3, SOURCE_SIZE, SOURCE_SIZE))
    return (frozen if frozen is not None else model), model


def freeze_for_inference(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """``model`` traced on ``example``, frozen (batch norms folded, weights inlined) and
    optimised for inference (oneDNN pre-packed convolutions); None where this torch build
    cannot, and the caller runs the eager model. The trace follows ``example``'s dtype and
    size, so the module takes inputs of that kind, any batch size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices; the tracer's shape note
            with torch.no_grad():
                traced = torch.jit.trace(model.eval(), example, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as exc:  # pragma: no cover - depends on the torch build
        log.warning("TorchScript freezing failed (%s); running the eager model", exc)
        return None


class Forward:
    """uint8 images (N, 3, 32, 32) on the CPU -> class probabilities, float32 (N, C) on the CPU.

    Holds one or two prepared copies of the model ("variants") and, per batch size, which one
    to run. On CPU in fp32 those are the TorchScript-frozen model (batch norm folded, weights
    pre-packed for oneDNN, runs without the GIL: by far the fastest from batch 2-4 up) and the
    eager model with batch norms folded in channels-last layout (often the fastest at batch 1).
    Both compute the same function (probabilities agree to ~1e-6); :meth:`tune` times them at
    small batch sizes and keeps the faster one for each.
    """

    #: Batch sizes at which the variants are compared; larger batches use the default variant.
    TUNE_SIZES = (1, 2, 3, 4)

    def __init__(self, variants: dict[str, nn.Module], default: str, device: torch.device, autocast: bool) -> None:
        self.variants = variants
        self.default = default
        self.device = device
        self.autocast = autocast
        self.choice: dict[int, str] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.variants[self.choice.get(int(images.shape[0]), self.default)], images)

    def run(self, core: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            if self.autocast:
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    logits = core(x)
            else:
                logits = core(x)
            return torch.softmax(logits.float(), dim=1).cpu()

    def tune(self, sizes: tuple[int, ...] = TUNE_SIZES, repeats: int = 7) -> dict[int, str]:
        """Time every variant at each batch size and keep the fastest.

        The variants take turns (one run each per round) and each keeps its best time: a
        burst of other work on a shared machine then slows every variant alike, or only
        some rounds, instead of deciding the choice (a median of consecutive runs of one
        variant once picked a runtime twice as slow at batch 1).
        """
        if len(self.variants) < 2:
            return {}
        for size in sizes:
            x = torch.zeros(size, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
            best = dict.fromkeys(self.variants, float("inf"))
            for core in self.variants.values():
                self.run(core, x)
            for _ in range(repeats):
                for name, core in self.variants.items():
                    start = time.perf_counter()
                    self.run(core, x)
                    best[name] = min(best[name], time.perf_counter() - start)
            fastest = min(best, key=best.__getitem__)
            if fastest != self.default:
                self.choice[size] = fastest
            else:
                self.choice.pop(size, None)
        return dict(self.choice)

    def describe(self) -> str:
        text = self.default
        others = sorted(n for n in set(self.choice.values()) if n != self.default)
        for name in others:
            sizes = sorted(k for k, v in self.choice.items() if v == name)
            text += f" ({name} at batch {', '.join(map(str, sizes))})"
        return text + ("+bf16" if self.autocast else "")


def build_forward(model: Classifier, device: torch.device, *, jit: bool, precision: str) -> Forward:
    """Prepare ``model`` for inference on ``device`` (see :class:`Forward`)."""
    model = model.eval()
    autocast = precision == "bf16"
    variants: dict[str, nn.Module] = {}
    if jit and device.type == "cpu" and not autocast:
        frozen = freeze_for_inference(model, torch.zeros(1, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8))
        if frozen is not None:
            variants["torchscript-frozen"] = frozen
    eager = copy.deepcopy(model)
    fold_batch_norms(eager.net)
    variants["eager-channels-last"] = eager.to(device=device, memory_format=torch.channels_last).eval()
    default = "torchscript-frozen" if "torchscript-frozen" in variants else "eager-channels-last"
    return Forward(variants, default, device, autocast)


def warm_up(forward: Forward, max_size: int, budget_s: float = 20.0) -> dict[int, str]:
    """First calls are slow (TorchScript profiling runs, oneDNN kernels built per shape): pay for
    them before serving, then pick the fastest variant per small batch size. Batch sizes 1 and
    ``max_size`` always; every size in between while the budget lasts."""
    sizes = [1, 1, 1, max_size, max_size, *range(2, max_size)]
    deadline = time.perf_counter() + budget_s
    for i, size in enumerate(sizes):
        if i >= 5 and time.perf_counter() > deadline:
            log.info("warm-up budget spent before batch size %d", size)
            break
        forward(torch.zeros(size, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8))
    return forward.tune(tuple(s for s in Forward.TUNE_SIZES if s <= max(1, max_size)))
