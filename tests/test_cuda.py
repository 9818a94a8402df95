"""What only a GPU can show: skipped on machines without CUDA (CI), run by bench/gpu_session.sh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.cli import main
from training.registry import Registry

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_smoke_training_on_cuda_then_cpu_reload_agrees(small_archive: Path, tmp_path: Path) -> None:
    """Trained on the GPU (bf16 autocast, channels_last, GPU augmentation), served anywhere."""
    assert main(["--quiet", "--registry", str(tmp_path), "train", "--data", str(small_archive),
                 "--profile", "smoke", "--device", "cuda"]) == 0
    reg = Registry(tmp_path)
    version = reg.latest()
    assert reg.metadata(version)["device"] == torch.cuda.get_device_name(0)
    cpu = reg.load(version, device="cpu")
    gpu = reg.load(version, device="cuda")
    images = cpu.background()[:16]
    with torch.inference_mode():
        a = cpu.model(images)
        b = gpu.model(images.cuda()).cpu()
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
