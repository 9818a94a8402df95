"""What the BentoML peer (``service.py`` beside this file) reads from the environment.

The shared ``MODEL_REGISTRY`` and ``MODEL_VERSION`` (:class:`shapcore.settings.SharedSettings`:
the version shapserve serves) and the peer's own knobs, which ``bench/load_predict.py --server
bentoml`` sets.
"""

from __future__ import annotations

from pydantic import Field

from shapcore.settings import SharedSettings


class PeerSettings(SharedSettings):
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of each BentoML worker.")
    bento_workers: int = Field(1, ge=1, description="BentoML worker processes.")
    bento_max_batch: int = Field(32, ge=1, description="BentoML's adaptive batching: most images in one batch.")
    bento_max_latency_ms: int = Field(1000, ge=1, description="BentoML's adaptive batching: latency target.")
