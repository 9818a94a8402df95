"""High-sample KernelSHAP references on held-out validation images, computed once and cached (issue 26).

    PYTHONPATH=. .venv/bin/python bench/references.py --registry /work/models [--version V]
        [--images 30] [--ceiling 10] [--samples 20000] [--cache /work/refcache]

The images are the first ``--images`` of a seeded shuffle of the version's held-out 20 %
(never trained on), picked as ``bench/explain_compare.py`` picks them. The reference is
``shap.KernelExplainer`` (``worker.methods.kernel.kernel_shap``) at ``--samples`` over the
image's SLIC superpixels with the service's defaults (segments, compactness, background), on
the model as the worker runs it (``worker.runtime.prepare_model``) through the shared value
function (``shapcore.value.CoalitionModel``): the same players and fill as a served
explanation. ``--ceiling N`` adds a second reference with another seed on the first N images:
the two references' own Spearman ρ is the ceiling of any ρ measured against one.

One ``.npz`` per image and seed under ``<cache>/<version>/``, named by the image's held-out
index: ``values`` (M, C), ``base`` (C,), ``fx`` (C,), ``labels`` (the SLIC label map: player
``j`` is ``labels == j``), ``weights`` (M, 32·32, the area weights the value function uses),
``image`` (3, 32, 32 uint8), ``label``, ``settings`` (JSON). Other benches load them with
:func:`load_references` (or compute the missing ones with :func:`ensure_reference`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_CACHE = Path("/work/refcache")
REFERENCE_SAMPLES = 20_000
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Reference:
    """One cached reference: ``values`` (M, C) and what produced them."""

    index: int
    seed: int
    values: np.ndarray
    base: np.ndarray
    fx: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    image: np.ndarray
    label: int
    settings: dict
    path: Path

    @property
    def target(self) -> int:
        """The predicted class (what the service explains by default)."""
        return int(np.argmax(self.fx))


def reference_path(cache: Path, version: str, index: int, seed: int) -> Path:
    return Path(cache) / version / f"heldout{index:05d}-seed{seed}.npz"


def read_reference(path: Path) -> Reference:
    with np.load(path) as z:
        settings = json.loads(str(z["settings"]))
        return Reference(index=int(settings["index"]), seed=int(settings["seed"]), values=z["values"], base=z["base"],
                         fx=z["fx"], labels=z["labels"], weights=z["weights"], image=z["image"],
                         label=int(z["label"]), settings=settings, path=path)  # fmt: skip


class Setup:
    """The version's model as the worker runs it, its fill and the picked held-out images."""

    def __init__(self, registry: str, version: str | None, data: str, images: int, threads: int | None = None) -> None:
        import torch
        from explain_compare import held_out_images

        from shapcore.jobs.settings import ExplainSettings
        from shapcore.registry import Registry
        from worker.runtime import prepare_model

        if threads:
            torch.set_num_threads(threads)
        self.settings = ExplainSettings()
        reg = Registry(registry)
        self.version = reg.resolve(version)
        self.data = held_out_images(reg, self.version, data, images, SHUFFLE_SEED)
        self.loaded, _ = prepare_model(reg.load(self.version))

    def value_function(self, n: int):
        """(CoalitionModel, Segmentation, image index in the held-out set) of the n-th picked image."""
        import torch
        from PIL import Image

        from shapcore.background import make_background
        from shapcore.explain.background import parse_background
        from shapcore.value import CoalitionModel
        from worker.segmentation import segment

        s = self.settings
        x = torch.from_numpy(self.data["images"][n])
        image = Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")
        spec = parse_background(s.explain_default_background, len(self.loaded.background()))
        fill = make_background(spec, self.loaded.background(), x)
        seg = segment(image, s.explain_default_segments, max_side=s.explain_slic_max_side,
                      compactness=s.explain_slic_compactness)  # fmt: skip
        f = CoalitionModel(self.loaded.model, x, seg.weights, fill, batch_size=s.explain_batch_size)
        return f, seg, int(self.data["indices"][n])

    def describe(self, index: int, seed: int, samples: int) -> dict:
        s = self.settings
        return reference_settings(self.version, index, seed, samples, s.explain_default_segments,
                                  s.explain_slic_compactness, s.explain_default_background, SHUFFLE_SEED)  # fmt: skip


def reference_settings(version: str, index: int, seed: int, samples: int, segments: int, compactness: float,
                       background: str, shuffle_seed: int) -> dict:  # fmt: skip
    """What a cached reference records of how it was made (:data:`SAME`: what two must share)."""
    return {"version": version, "index": index, "seed": seed, "samples": samples,
            "estimator": "shap.KernelExplainer (l1_reg off)", "segments": segments, "slic_compactness": compactness,
            "background": background, "players": "slic", "shuffle_seed": shuffle_seed}  # fmt: skip


def ensure_reference(setup: Setup, n: int, cache: Path, seed: int = 0, samples: int = REFERENCE_SAMPLES) -> Reference:
    """The n-th picked image's reference with ``seed``: loaded when cached, else computed and cached."""
    index = int(setup.data["indices"][n])
    path = reference_path(cache, setup.version, index, seed)
    if path.exists():
        return checked(read_reference(path), setup.describe(index, seed, samples))
    f, seg, _ = setup.value_function(n)
    return compute_reference(path, f, seg, setup.data["images"][n], int(setup.data["labels"][n]),
                             setup.describe(index, seed, samples))  # fmt: skip


#: The settings two references must share to stand for each other.
SAME = ("version", "index", "seed", "samples", "segments", "slic_compactness", "background", "players")


def checked(ref: Reference, wanted: dict) -> Reference:
    """``ref`` if it was made with the ``wanted`` settings, else an error naming the difference."""
    differ = {k: (ref.settings.get(k), wanted[k]) for k in SAME if k in wanted and ref.settings.get(k) != wanted[k]}
    if differ:
        raise SystemExit(f"{ref.path} was made with other settings (cached, wanted): {differ}; use another --cache")
    return ref


def compute_reference(path: Path, f, seg, image: np.ndarray, label: int, settings: dict) -> Reference:
    """KernelSHAP (``shap.KernelExplainer`` through ``worker.methods.kernel``) at ``settings["samples"]``
    with ``settings["seed"]`` over ``seg``'s players of the value function ``f``, written to ``path``
    (the one format and cache of every bench that scores against a reference)."""
    from worker.methods.kernel import kernel_shap

    start = time.perf_counter()
    out = kernel_shap(f, seg.count, settings["samples"], settings["seed"])
    settings = settings | {"seconds": time.perf_counter() - start, "coalitions": out["coalitions"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, values=out["phi"], base=out["base"], fx=out["fx"], labels=seg.labels,
                        weights=seg.weights, image=image, label=label, settings=json.dumps(settings))  # fmt: skip
    tmp.replace(path)
    return read_reference(path)


def load_references(cache: Path, version: str, seed: int = 0) -> list[Reference]:
    """Every cached reference of ``version`` with ``seed``, in the shuffle's order (held-out index order
    is not the shuffle's: the settings keep the index; callers match by it)."""
    return [read_reference(p) for p in sorted((Path(cache) / version).glob(f"heldout*-seed{seed}.npz"))]


def ceiling(cache: Path, version: str) -> list[float]:
    """Spearman ρ of the target class between seed 0 and seed 1, for every image that has both."""
    from shapcore.agreement import spearman

    out = []
    for ref in load_references(cache, version, 0):
        other = reference_path(cache, version, ref.index, 1)
        if other.exists():
            again = read_reference(other)
            out.append(spearman(ref.values[:, ref.target], again.values[:, ref.target]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None, help="default: promoted, else newest")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--start", type=int, default=0, help="skip the first picked images")
    p.add_argument("--ceiling", type=int, default=10, help="a second seed on the first N images")
    p.add_argument("--samples", type=int, default=REFERENCE_SAMPLES)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    setup = Setup(args.registry, args.version, args.data, args.images, args.threads)
    cache = Path(args.cache)
    picked = cache / setup.version / f"heldout-images-{args.images}.npz"
    if not args.data.endswith(".npz") and not picked.exists():  # later runs: --data this file (no decoding)
        picked.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(picked, **setup.data)
    for n in range(args.start, args.images):
        for seed in (0, 1) if n < args.ceiling else (0,):
            start = time.perf_counter()
            ref = ensure_reference(setup, n, cache, seed, args.samples)
            print(f"[{n + 1}/{args.images}] held-out {ref.index} seed {seed}: M={ref.values.shape[0]} "
                  f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    rhos = ceiling(cache, setup.version)
    if rhos:
        print(json.dumps({"version": setup.version, "ceiling_images": len(rhos), "ceiling_rho_median":
                          float(np.median(rhos)), "ceiling_rho_min": float(np.min(rhos))}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
