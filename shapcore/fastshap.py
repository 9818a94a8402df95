"""The amortised SHAP explainer of a model version (FastSHAP): one forward pass per explanation.

FastSHAP (Jethani, Sudarshan, Covert, Lee, Ranganath, ICLR 2022) trains a network
``φ(x) -> (players, classes)`` once, against the classified model's own value function, so
that an explanation costs one forward pass of a small network instead of KernelSHAP's
thousands of model evaluations. Training lives in :mod:`training.fastshap`; this module holds
what training, the service and the benches share:

- :class:`ResNetExplainer` (the default since issue 26): the classified model's own ResNet-50,
  copied from it and fine-tuned whole, with a head that reads its 8×8, 4×4, 2×2 and 1×1 feature
  maps and outputs one value per grid cell (:mod:`shapcore.players`, 64 players) and class
  (ViT-Shapley's recipe, Covert, Kim, Lee, ICLR 2023, on a CNN); :class:`ExplainerNet`: the
  small network trained from scratch (issue 17), kept for models that are not a ResNet-50;
- :func:`efficient_normalize`: the paper's additive efficient normalisation, which makes the
  values add up to ``v(all) − v(none)`` for every class, as Shapley values do;
- the file stored in the version's folder (``explainer.safetensors``, with its metadata) and
  :func:`load_explainer`, which refuses a file made for another version, another class list
  or another player layout with a clear error.

The value function is the service's KernelSHAP one (:mod:`shapcore.value`) with the ``mean``
background: ``v(S)`` = the model's class probabilities on the image whose cells outside S
show the per-pixel mean of the version's stored training images. ``v(none)`` (the mean image
alone) is the same for every image and is stored with the explainer.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from shapcore.errors import UserError
from shapcore.inference import fold_batch_norms
from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, SOURCE_SIZE
from shapcore.players import GRID_CELLS
from shapcore.store import atomic_target

#: The explainer's file in a version's folder.
EXPLAINER_FILE = "explainer.safetensors"
#: Bumped when the network or the file's meaning changes; older files are refused at load.
FORMAT = "shapserve-fastshap/3"
#: Formats this release still reads (2: the small network, before the kinds).
READABLE_FORMATS = ("shapserve-fastshap/2", FORMAT)
#: The fill the explainer was trained against (the value function's background).
BACKGROUND = "mean"


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ExplainerNet(nn.Module):
    """Float images (N, 3, 32, 32) in [0, 1] and the model's probabilities on them (N, classes)
    -> raw values (N, cells², classes).

    Three stages at 32, 16 and 8 px (two 3×3 convolutions each), then a per-cell head that also
    sees the image as a whole (its globally pooled features): a cell's Shapley value depends on
    the rest of the picture, which a 3×3 stack at 8 px alone would see only in part. About
    0.2 M multiply-adds per unit of ``width``² (width 48: ~90 M), a few milliseconds at batch 1
    on a CPU core.
    """

    def __init__(self, classes: int, *, width: int = 48, cells: int = GRID_CELLS) -> None:
        super().__init__()
        if SOURCE_SIZE // cells != 4:
            raise ValueError(f"the explainer's layers put one output per 4x4 block: {cells} cells do not fit")
        self.classes, self.width, self.cells = int(classes), int(width), int(cells)
        w = self.width
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        # The values' typical size, set when the fit starts (stored with the weights): the layers
        # work at unit scale while the values are differences of probabilities, often ~1e-3.
        self.register_buffer("scale", torch.ones(()))
        self.features = nn.Sequential(
            _conv(3, w),
            _conv(w, w),
            _conv(w, 2 * w, 2),
            _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, 2),
            _conv(4 * w, 4 * w),
        )
        # SiLU, not ReLU, after the batch norms end: a ReLU head can die whole, and its output is
        # then one constant per class (seen once in a fit).
        # The context also sees the model's own probabilities on the image (known at every call:
        # efficiency needs them anyway): what the model believes decides which cells matter.
        self.context_in = nn.Linear(4 * w + self.classes, 4 * w)
        self.head = nn.Sequential(nn.Conv2d(8 * w, 4 * w, 1), nn.SiLU(), nn.Conv2d(4 * w, self.classes, 1))

    def forward(self, images: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        h = self.features((images - self.mean) / self.std)  # (N, 4w, 8, 8)
        pooled = torch.cat([h.mean(dim=(2, 3)), probabilities.to(h.dtype)], dim=1)
        g = F.silu(self.context_in(pooled))[:, :, None, None].expand_as(h)
        out = self.head(torch.cat([h, g], dim=1))  # (N, classes, 8, 8)
        return (out * self.scale).flatten(2).transpose(1, 2)  # (N, 64, classes), cells row by row

    def config(self) -> dict[str, Any]:
        return {"kind": "small", "classes": self.classes, "width": self.width, "cells": self.cells}


class ResNetExplainer(nn.Module):
    """The classified model's ResNet-50 as an explainer: float images (N, 3, 32, 32) in [0, 1] and
    the model's probabilities on them (N, classes) -> raw values (N, cells², classes).

    At 32 px torchvision's ResNet-50 has feature maps of 8×8 (layer1, one position per 4×4-px grid
    cell), 4×4, 2×2 and 1×1 (layer4): each is projected to ``width`` channels, brought to 8×8 and
    summed with a context vector (layer4's pooled features and the model's probabilities), and a
    small convolutional head turns that into one value per cell and class. Initialised from the
    classifier (:meth:`from_classifier`), the trunk starts out knowing what the model looks at
    (ViT-Shapley's point: a separate network trained from scratch must learn that first). The
    batch norms keep the classifier's statistics during the fit (eval mode): small batches of
    images should not move them. The head's last layer starts near zero: the untrained explainer
    is (nearly) the even split.
    """

    def __init__(self, classes: int, *, width: int = 128, cells: int = GRID_CELLS,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:  # fmt: skip
        super().__init__()
        if SOURCE_SIZE // cells != 4:
            raise ValueError(f"layer1 of a ResNet-50 at 32 px is 8x8: {cells} cells do not fit")
        self.classes, self.width, self.cells = int(classes), int(width), int(cells)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.ones(()))  # as ExplainerNet's: the values' typical size
        trunk = torchvision.models.resnet50()
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        w = self.width
        self.lateral = nn.ModuleList(nn.Conv2d(c, w, 1) for c in (256, 512, 1024))
        self.context_in = nn.Linear(2048 + self.classes, w)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, self.classes, 1))
        nn.init.normal_(self.head[-1].weight, std=1e-3)  # near the even split, not on it
        nn.init.zeros_(self.head[-1].bias)

    @classmethod
    def from_classifier(
        cls,
        classifier: nn.Module,
        classes: int,
        *,
        width: int = 128,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> ResNetExplainer:
        """A new explainer whose trunk is a copy of ``classifier``'s (a torchvision ResNet-50 whose
        batch norms are not folded yet); its own ``fc`` is left out."""
        net = cls(classes, width=width, mean=mean, std=std)
        state = {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
        own = {"conv1": "stem.0", "bn1": "stem.1"}
        renamed = {(own[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]) if k.split(".", 1)[0] in own else k: v
                   for k, v in state.items()}  # fmt: skip
        missing, unexpected = net.load_state_dict(renamed, strict=False)
        if unexpected or any(
            not k.startswith(("lateral.", "context_in.", "head.", "mean", "std", "scale")) for k in missing
        ):
            raise UserError(f"the classifier is not a torchvision ResNet-50: {unexpected[:3]} {missing[:3]}")
        return net

    def train(self, mode: bool = True) -> ResNetExplainer:
        super().train(mode)
        for m in self.modules():  # the classifier's batch statistics stay
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, images: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        h1 = self.layer1(self.stem(x))  # (N, 256, 8, 8) at 32 px
        h2 = self.layer2(h1)  # 4x4
        h3 = self.layer3(h2)  # 2x2
        h4 = self.layer4(h3).mean(dim=(2, 3))  # (N, 2048)
        size = h1.shape[-2:]
        h = self.lateral[0](h1)
        h = h + F.interpolate(self.lateral[1](h2), size=size, mode="nearest")
        h = h + F.interpolate(self.lateral[2](h3), size=size, mode="nearest")
        context = self.context_in(torch.cat([h4, probabilities.to(h4.dtype)], dim=1))
        out = self.head(h + context[:, :, None, None])  # (N, classes, 8, 8)
        return (out * self.scale).flatten(2).transpose(1, 2)  # (N, 64, classes), cells row by row

    def config(self) -> dict[str, Any]:
        return {"kind": "resnet50", "classes": self.classes, "width": self.width, "cells": self.cells}


#: The explainer networks, by the ``kind`` stored in their file's ``network``.
Network = ExplainerNet | ResNetExplainer


def build_network(config: dict[str, Any]) -> Network:
    """An untrained network of the shape ``config`` (a file's ``network``) describes."""
    kind = config.get("kind", "small")
    args = int(config["classes"]), int(config["width"]), int(config["cells"])
    if kind == "small":
        return ExplainerNet(args[0], width=args[1], cells=args[2])
    if kind == "resnet50":
        return ResNetExplainer(args[0], width=args[1], cells=args[2])
    raise ValueError(f"unknown explainer network {kind!r}")


def efficient_normalize(raw: torch.Tensor, grand: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Shift ``raw`` (N, M, C) per image and class so that its M values add up to
    ``grand − null`` ((N, C) minus (C,)): the paper's additive efficient normalisation."""
    gap = (grand - null) - raw.sum(dim=1)
    return raw + gap.unsqueeze(1) / raw.shape[1]


@dataclass
class FastExplainer:
    """A loaded explainer: the network (eval mode), ``null`` = v(no player) (C,), its metadata."""

    net: Network
    null: torch.Tensor
    meta: dict[str, Any]

    @property
    def players(self) -> int:
        return self.net.cells * self.net.cells

    def explain(self, images: torch.Tensor, grand: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) float images in [0, 1] and the model's probabilities on them (N, C) ->
        Shapley values (N, players, C), efficient by construction."""
        with torch.inference_mode():
            return efficient_normalize(self.net(images, grand.float()), grand.float(), self.null)


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """What ``/model`` says of a version's explainer (no weights, no training curve)."""
    keep = ("players", "layout", "background", "created", "fit_seconds", "images_seen", "coalitions_seen",
            "objective", "labelled_images", "validation_loss", "validation_gain", "validation_rho",
            "forward_ms")  # fmt: skip
    return {k: meta[k] for k in keep if k in meta}


def save_explainer(folder: Path, net: Network, null: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write ``explainer.safetensors`` into a version folder, atomically (a reader sees the old
    file or the new one, never half of one)."""
    meta = {**meta, "format": FORMAT, "network": net.config(), "background": BACKGROUND}
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["null"] = null.detach().float().cpu().contiguous()
    with atomic_target(folder / EXPLAINER_FILE) as tmp:
        save_file(tensors, tmp, metadata={"shapserve": json.dumps(meta)})
    return folder / EXPLAINER_FILE


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of an explainer file, without loading its weights; UserError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("shapserve")
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read the explainer file {path}: {exc}") from None
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a shapserve explainer (no shapserve metadata)")
    return meta


def load_explainer(
    path: Path, *, version: str, class_names: list[str], device: str | torch.device = "cpu"
) -> FastExplainer:
    """Load and check an explainer for ``version``; UserError saying what does not match."""
    meta = read_meta(path)
    if meta.get("format") not in READABLE_FORMATS:
        raise UserError(f"{path}: explainer format {meta.get('format')!r}, this release reads {FORMAT!r}; fit it again")
    if meta.get("model_version") != version:
        raise UserError(
            f"{path} was fitted for model version {meta.get('model_version')!r}, not {version!r}: an explainer "
            f"estimates one model's values; fit one for this version "
            f"(python -m training fit-explainer --version {version})"
        )
    if meta.get("class_names") != list(class_names):
        raise UserError(f"{path}: its classes {meta.get('class_names')} are not the version's {list(class_names)}")
    if meta.get("layout") != "grid" or meta.get("background") != BACKGROUND:
        raise UserError(f"{path}: players {meta.get('layout')!r} / background {meta.get('background')!r} unknown")
    config = meta.get("network") or {}
    try:
        net = build_network(config)
        tensors = load_file(str(path))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        null = tensors["null"].float()
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{path}: the explainer's weights do not load: {str(exc).splitlines()[0][:300]}") from None
    if null.shape != (len(class_names),) or net.classes != len(class_names):
        raise UserError(f"{path}: {net.classes} outputs for {len(class_names)} classes")
    net.eval().to(device)
    if isinstance(net, ResNetExplainer):
        fold_batch_norms(net)  # the trunk's batch norms into its convolutions: the same values, faster
    for p in net.parameters():
        p.requires_grad_(False)
    return FastExplainer(net=net, null=null.to(device), meta=meta)


def forward_ms(net: Network, repeats: int = 50) -> float:
    """p50 milliseconds of one batch-1 forward pass, in this process, as the API runs it."""
    x, p = torch.rand(1, 3, SOURCE_SIZE, SOURCE_SIZE), torch.full((1, net.classes), 1.0 / net.classes)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            t0 = time.perf_counter()
            net(x, p)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)
