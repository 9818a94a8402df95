"""What training reads from the environment: the training family of :class:`shapcore.settings.SharedSettings`.

Everything else a run needs comes from the command line (``training/cli.py``) and its profile
(``training/presets.py``). ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are torchrun's: it sets
them for each process it starts (``training/distributed.py``). Read anew at each use, not cached:
the values belong to the process, and the tests set them per test.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shapcore.settings import SharedSettings


def _default_cache() -> Path:
    return Path.home() / ".cache" / "shapserve"


class TrainingSettings(SharedSettings):
    """``SHAPSERVE_CACHE`` and torchrun's variables, beside the shared ones (``MODEL_REGISTRY`` is
    the default of ``--registry``)."""

    shapserve_cache: Path = Field(
        default_factory=_default_cache, description="Decoded data sets and torchvision downloads."
    )
    rank: int = Field(0, description="This process's rank among all of torchrun's (0: the one that reports).")
    world_size: int = Field(1, description="Processes torchrun started (1: not distributed).")
    local_rank: int = Field(0, description="This process's rank on its machine: the CUDA device it takes.")
    explain_quality_images: int = Field(
        8, ge=0, description="fit-explainer's --quality-images default: held-out images it scores the explainer "
        "on against KernelSHAP (0: not scored, and the service will not serve it)."
    )
    explain_quality_samples: int = Field(
        2048, ge=8, description="fit-explainer's --quality-samples default: KernelSHAP's coalitions for the "
        "reference and for KernelSHAP's own figures."
    )
