"""The peer of the side-by-side /predict bench: the same model behind BentoML's adaptive batching.

Not part of shapserve: ``bench/compare_bentoml.sh`` installs BentoML into a venv of its own
and ``bench/load_predict.py --server bentoml`` serves this file with it. The model is the
version shapserve serves (shapcore's registry loader), TorchScript-frozen as shapserve's
batched path is, run on the same torch threads; an upload is decoded by BentoML (PIL) and
reduced to 32x32 by shapcore's own ``to_source_size``. One request: multipart field ``file``
holding one image; answer: its top 3 classes.

Environment (``bench/bentoml_peer/settings.py``): ``MODEL_REGISTRY``, ``MODEL_VERSION``,
``TORCH_THREADS`` (default 1), ``BENTO_WORKERS`` (default 1), ``BENTO_MAX_BATCH`` (32),
``BENTO_MAX_LATENCY_MS`` (1000).
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
from PIL.Image import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.bentoml_peer.settings import PeerSettings

SETTINGS = PeerSettings()


@bentoml.service(
    workers=SETTINGS.bento_workers,
    traffic={"timeout": 120, "max_concurrency": 256},
)
class Classifier:
    def __init__(self) -> None:
        import torch

        from shapcore.inference import freeze_for_inference
        from shapcore.model import SOURCE_SIZE
        from shapcore.registry import Registry

        torch.set_num_threads(SETTINGS.torch_threads)
        loaded = Registry(SETTINGS.model_registry).load(SETTINGS.model_version)
        self.labels = loaded.class_names
        example = torch.zeros(1, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
        self.model = freeze_for_inference(loaded.model.eval(), example) or loaded.model.eval()

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.bento_max_batch,
        max_latency_ms=SETTINGS.bento_max_latency_ms,
    )
    def predict(self, file: list[Image]) -> list[list[dict]]:
        import torch

        from shapcore.model import to_source_size

        batch = torch.stack([to_source_size(image) for image in file])
        with torch.inference_mode():
            top = torch.softmax(self.model(batch).float(), dim=1).topk(3, dim=1)
        return [
            [
                {"label": self.labels[int(i)], "index": int(i), "probability": float(p)}
                for p, i in zip(ps, ix, strict=True)
            ]
            for ps, ix in zip(top.values, top.indices, strict=True)
        ]
