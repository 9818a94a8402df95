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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_service_forward_on_cuda_agrees_with_cpu(smoke_model: tuple[Path, str], precision: str) -> None:
    """The service's prepared forward pass on the GPU gives the CPU's probabilities."""
    from service.engine import build_forward, warm_up

    registry, version = smoke_model
    loaded = Registry(registry).load(version, device="cpu")
    images = loaded.background()[:32]
    cpu = build_forward(loaded.model, torch.device("cpu"), jit=True, precision="fp32")
    gpu = build_forward(Registry(registry).load(version, device="cpu").model, torch.device("cuda"), jit=True,
                        precision=precision)  # fmt: skip
    warm_up(gpu, max_size=8, budget_s=2.0)
    want = cpu(images)
    for size in (1, 3, 32):
        got = gpu(images[:size])
        assert got.device.type == "cpu" and got.dtype == torch.float32
        assert torch.allclose(got.sum(1), torch.ones(size), atol=1e-4)
        # cuDNN convolutions run in TF32 by default on Ampere and later; bf16 keeps 8 mantissa bits
        assert torch.allclose(got, want[:size], atol=5e-3 if precision == "fp32" else 3e-2)
