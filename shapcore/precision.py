"""bf16 on the hardware at hand: whether it is native, and the autocast form of a network.

bf16 autocast can run a ResNet-50 twice as fast where the hardware has native bf16 (CUDA,
CPUs with AVX512-BF16 or AMX), and slower where it has not; it also rounds, so near-ties
between two classes can flip. Whether it runs is the runtime gate's decision
(:mod:`shapcore.gate`: bf16 is one of its candidates, :mod:`shapcore.runtimes`), made by
measurement like every other candidate's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class BF16Autocast(nn.Module):
    """``inner`` run under bf16 autocast on ``device_type``, its output back in fp32."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            return self.inner(images).float()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
