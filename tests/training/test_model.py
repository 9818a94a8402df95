"""The model head, registry round trip, atomic publish and evaluation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shapcore.model import Classifier, Preprocess, build_model
from shapcore.registry import Registry
from training.evaluate import compute_metrics, format_tables


def test_head_is_dropout_then_linear_2048_to_10() -> None:
    net = build_model(10)
    assert isinstance(net.fc, nn.Sequential) and len(net.fc) == 2
    assert isinstance(net.fc[0], nn.Dropout) and net.fc[0].p == 0.5
    assert isinstance(net.fc[1], nn.Linear)
    assert (net.fc[1].in_features, net.fc[1].out_features) == (2048, 10)
    # the whole network is trainable (fine-tuned, nothing frozen)
    assert all(p.requires_grad for p in net.parameters())


def test_preprocess_upsamples_and_normalises() -> None:
    pre = Preprocess(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = pre(x)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out, torch.full_like(out, 2.0))


def test_checkpoint_round_trip_gives_the_saved_model(smoke_model: tuple[Path, str], tmp_path: Path) -> None:
    """What a registry load returns is the in-memory model that was published: every tensor
    of its state (weights and batch-norm statistics) and its logits on real images."""
    root, version = smoke_model
    trained = Registry(root).load(version)
    meta = trained.metadata
    images = trained.background()[:8]
    # The trained model, changed in memory so that no file holds it yet: nudged weights and
    # batch-norm statistics updated by a training-mode pass over real images.
    torch.manual_seed(0)
    net = build_model(len(meta["class_names"]))
    net.load_state_dict(trained.model.net.state_dict())
    saved = Classifier(net, trained.model.preprocess)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param), alpha=1e-2)
        saved.train()(images)
    saved.eval()

    out = Registry(tmp_path)
    out.publish("20260101-000000-abcdef", net, {**meta, "version": "20260101-000000-abcdef"}, images, [])
    loaded = out.load("20260101-000000-abcdef")
    expected, got = net.state_dict(), loaded.model.net.state_dict()
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert not torch.equal(got["fc.1.weight"], trained.model.net.state_dict()["fc.1.weight"])
    with torch.inference_mode():
        assert torch.equal(loaded.model(images), saved(images))
    assert torch.equal(loaded.background(), images)


def test_published_version_metadata(smoke_model: tuple[Path, str]) -> None:
    root, version = smoke_model
    a = Registry(root).load(version)
    meta = a.metadata
    for key in ("architecture", "class_names", "input_size", "normalization", "profile", "hyperparameters",
                "data", "epochs_run", "best_val_loss", "best_val_accuracy", "torch_version",
                "torchvision_version", "git_commit", "created_at"):
        assert key in meta, key
    assert meta["architecture"] == "resnet50" and meta["data"]["train_size"] == 240  # 80% of 300
    assert a.background().dtype == torch.uint8 and a.background().shape[1:] == (3, 32, 32)
    assert not list(root.glob("**/*.pt")) and not list(root.glob("**/*.pth")) and not list(root.glob("**/*.pkl"))


def test_publish_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shapcore.registry as registry_module

    reg = Registry(tmp_path)
    net = build_model(10)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(registry_module, "write_json_atomic", crash)
    with pytest.raises(OSError):
        reg.publish("20260101-000000-aaaaaa", net, {"x": 1}, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [])
    assert reg.versions() == []
    assert not (tmp_path / "20260101-000000-aaaaaa").exists()
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_metrics_against_hand_computed_values() -> None:
    # 3 classes. truth/prediction pairs give this confusion matrix (rows = truth):
    #   a: [2, 1, 0]   b: [0, 3, 1]   c: [1, 0, 2]
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 0])
    m = compute_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    # precision = tp / column sum; recall = tp / row sum
    pa, pb, pc = 2 / 3, 3 / 4, 2 / 3
    ra, rb, rc = 2 / 3, 3 / 4, 2 / 3
    assert m["per_class"]["a"]["precision"] == pytest.approx(pa)
    assert m["per_class"]["b"]["precision"] == pytest.approx(pb)
    assert m["per_class"]["c"]["recall"] == pytest.approx(rc)
    f1 = [2 * p * r / (p + r) for p, r in ((pa, ra), (pb, rb), (pc, rc))]
    assert m["per_class"]["b"]["f1"] == pytest.approx(f1[1])
    assert m["macro"]["precision"] == pytest.approx((pa + pb + pc) / 3)
    assert m["macro"]["recall"] == pytest.approx((ra + rb + rc) / 3)
    assert m["macro"]["f1"] == pytest.approx(sum(f1) / 3)
    assert [m["per_class"][k]["support"] for k in "abc"] == [3, 4, 3]
    table = format_tables(m)
    assert "Accuracy" in table and "70.00%" in table and "macro avg" in table


def test_classifier_accepts_float_and_uint8_alike() -> None:
    torch.manual_seed(0)
    model = Classifier(build_model(10), Preprocess(32, (0.5,) * 3, (0.25,) * 3)).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(model(x), model(x.float() / 255), atol=1e-5)


class _Payload:
    """Unpickling this creates a file: what a malicious "checkpoint" would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_payload_as_weights_is_refused_without_running(tmp_path: Path) -> None:
    from shapcore.errors import UserError
    from shapcore.model import build_model

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(marker)}, path)
    with pytest.raises(UserError, match="refused to unpickle"):
        build_model(weights=str(path))
    assert not marker.exists(), "the pickle payload ran"
