"""What only a GPU can show: skipped on machines without CUDA (CI), run by bench/gpu_session.sh."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shapcore.registry import Registry
from training.cli import main

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
    from shapcore.inference import build_forward, warm_up

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


def test_cuda_graph_training_steps_match_eager_steps() -> None:
    """The graphed forward+backward computes the eager step: same losses, same weights after."""
    import copy

    from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, Classifier, Preprocess, build_model
    from training.presets import PROFILES, make_optimizer, train_augmentation
    from training.train import autocast_for, graph_model, prepare_input, train_step

    dev = torch.device("cuda")
    # no randomness in the step (dropout, augmentation), fp32, and SGD (Adam's first steps move
    # every weight by about lr whatever the gradient's size): the two paths must agree
    cfg = PROFILES["smoke"].override(dropout=0.0, amp="off", crop_padding=0, hflip=False, optimizer="sgd", lr=0.01)
    torch.manual_seed(0)
    eager = Classifier(build_model(10, dropout=0.0), Preprocess(64, CIFAR10_MEAN, CIFAR10_STD)).to(dev)
    graphed = copy.deepcopy(eager)
    aug = train_augmentation(cfg).to(dev)
    autocast = autocast_for(cfg, dev)
    batches = [(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device=dev),
                torch.randint(0, 10, (32,), device=dev)) for _ in range(3)]  # fmt: skip
    assert graph_model(graphed, cfg, autocast, prepare_input(batches[0][0], aug, cfg))
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the capture's warm-up left batch-norm statistics alone
    opt_e, opt_g = make_optimizer(cfg, eager.net), make_optimizer(cfg, graphed.net)
    start = [p.detach().clone() for p in eager.net.parameters()]
    for images, labels in batches:
        loss_e, _ = train_step(eager, aug, opt_e, cfg, autocast, images, labels)
        loss_g, _ = train_step(graphed, aug, opt_g, cfg, autocast, images, labels)
        assert torch.allclose(loss_e, loss_g, rtol=1e-3, atol=1e-3)
    moved = 0.0
    for (name, a), b, a0 in zip(eager.net.named_parameters(), graphed.net.parameters(), start, strict=True):
        assert torch.allclose(a, b, atol=2e-3), name
        moved = max(moved, (a - a0).abs().max().item())
    assert moved > 1e-3  # the optimizer did step: the comparison above is not of untouched weights
    graphed.eval()  # eval mode runs the eager forward of the same weights
    with torch.inference_mode():
        x = prepare_input(batches[0][0], aug, cfg)
        assert torch.allclose(eager.eval()(x), graphed(x), atol=1e-2)


def test_explanation_worker_on_cuda(smoke_model: tuple[Path, str], cifar_jpeg: bytes, start_worker,
                                    explain_redis_url: str) -> None:  # fmt: skip
    """EXPLAIN_DEVICE=cuda: a real ``python -m worker`` (the real Redis) loads the version onto
    the GPU, runs its jobs in its own process (no work horse: CUDA does not survive fork),
    and its explanations (KernelSHAP over the value function's masks built on the GPU, and
    Grad-CAM through the autograd network there) finish and say they ran on cuda."""
    from shapcore.jobs.client import connect
    from shapcore.jobs.queue import JobRequest, submit
    from shapcore.jobs.settings import ExplainSettings
    from tests.support.workers import job_doc, job_image, wait_for

    registry, version = smoke_model
    queue = "explain-test-cuda"
    settings = ExplainSettings(redis_url=explain_redis_url, explain_queue=queue, explain_retries=0)
    conn = connect(explain_redis_url, 2.0)
    worker = start_worker(registry, env={"EXPLAIN_QUEUE": queue, "EXPLAIN_DEVICE": "cuda"})
    log = worker.log_tail()
    assert "preloaded on cuda" in log and "jobs in this process (no fork)" in log, log
    for method in ("kernel", "gradcam"):
        request = JobRequest.of(image=job_image(cifar_jpeg), model_version=version, segments=50, samples=2000,
                             background="train:8", seed=0, target=None, method=method)  # fmt: skip
        job, _ = submit(conn, settings, request)
        doc = wait_for(lambda job=job: (d := job_doc(conn, settings, job.id))["status"] in ("finished", "failed")
                       and d, 180, f"the {method} job on the GPU")  # fmt: skip
        assert doc["status"] == "finished", (doc, worker.log_tail())
        result = doc["result"]
        assert result["device"] == "cuda" and result["precision"] in ("fp32", "bf16"), result["device"]
        assert result["method"] == method and len(result["shap_values"]) == result["segments"]["count"]
        assert all(math.isfinite(v) for v in result["shap_values"])
        if method == "kernel":
            assert result["local_accuracy_residual"] < 1e-3
    assert worker.horses() == []  # nothing forked
    worker.stop()
