"""The one place where the network is built and its input is prepared.

Training, the prediction service and the explanation worker all import from here,
so that architecture and preprocessing cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from shapcore.errors import UserError

#: CIFAR-10 class names in label order (also the alphabetical folder order).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: Per-channel statistics of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Every image, in training and in serving, is first brought to this size: CIFAR's own.
SOURCE_SIZE = 32

ARCHITECTURES = ("resnet50",)
#: What ``--weights`` takes besides a path: torchvision's ImageNet weights, or none (random init).
IMAGENET, NO_WEIGHTS = "imagenet", "none"


class WeightsUnavailable(UserError):
    """torchvision could not fetch the ImageNet weights (no network, a proxy, a bad download)."""


def build_model(
    num_classes: int = 10,
    *,
    arch: str = "resnet50",
    dropout: float = 0.5,
    weights: str | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    """torchvision ResNet-50 whose last layer is Dropout(p) + Linear(2048, num_classes).

    ``weights``: None or ``"none"`` (random init), ``"imagenet"`` (torchvision's
    IMAGENET1K_V2 weights, downloaded once into torch's hub cache; :class:`WeightsUnavailable`
    when that fails) or a path to a local state dict (``.safetensors`` or ``.pth``).
    """
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    net = torchvision.models.resnet50(zero_init_residual=zero_init_residual)
    state = starting_state(weights)
    if state is not None:
        net.load_state_dict(state)
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, num_classes))
    return net


def starting_state(weights: str | None) -> dict[str, torch.Tensor] | None:
    """The torchvision ResNet-50 state dict (1000-class head included) that ``weights`` names,
    or None for random init; see :func:`build_model`."""
    if weights in (None, NO_WEIGHTS):
        return None
    if weights == IMAGENET:
        return fetch_imagenet_state()
    return _read_backbone_state(Path(weights))


def fetch_imagenet_state() -> dict[str, torch.Tensor]:
    """torchvision's ResNet-50 ImageNet weights (from the hub cache, else downloaded)."""
    entry = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    try:
        return entry.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError offline, HTTPError, a hash mismatch, a full disk
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(f"could not fetch torchvision's ImageNet weights from {entry.url} ({reason})") from exc


def _read_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only=True: tensors only, no arbitrary objects are unpickled.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for a payload, RuntimeError for junk
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path} is not a plain tensor state dict (refused to unpickle it): {first}") from exc
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise UserError(f"{path} is not a ResNet-50 state dict (no conv1.weight)")
    return state


class Preprocess(nn.Module):
    """uint8 images (N, 3, H, W) at SOURCE_SIZE -> normalised float input at ``input_size``.

    Upsampling and normalisation run on whatever device the batch is on (the GPU when
    there is one), so the data pipeline stays a handful of tensor operations.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Preprocess + network: uint8 images in, logits out. What service and worker run."""

    def __init__(self, net: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))


def to_source_size(image: PIL.Image.Image) -> torch.Tensor:  # noqa: F821
    """A PIL image (any mode or size) -> uint8 tensor (3, SOURCE_SIZE, SOURCE_SIZE).

    Matches how the training images look: CIFAR-10 is 32x32 RGB, so larger pictures are
    reduced (with antialiasing) to that size before the model sees them.
    """
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != (SOURCE_SIZE, SOURCE_SIZE):
        rgb = rgb.resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
