"""``method=fast``: the version's amortised explainer (:mod:`shapcore.fastshap`), answered in the request.

The explainer is read from the served version's folder (``explainer.safetensors``, written by
``python -m training fit-explainer``) when the version loads, and again whenever the file
changes, so an explainer fitted while the service runs is picked up by the next request. A
file that does not fit the version (another version's, a truncated one) is refused at load
with its reason, and ``method=fast`` then answers 409 with that reason, as it does when there
is no file at all. Everything else keeps working.

Quality travels with the answer (issue 26): the file's metadata holds the figures its fit
measured against KernelSHAP (:mod:`training.explainer_quality`); every answer carries them,
and an explainer whose median Spearman ρ is below ``EXPLAIN_FAST_MIN_RHO``, or that has no
figures (fitted by an older release; ``python -m training score-explainer`` adds them), is
not served: 409 naming the figure and the command (:func:`shapcore.explainer_status.refusal`).
While ``fit-explainer`` runs for the served version (its marker in the version's folder),
409 ``explainer_fitting`` says about how many minutes are left.

An answer costs one batched forward pass of the model (through the /predict batcher: the
probabilities that make the values efficient and give the target) and one pass of the small
explainer. Its result has the queued methods' shape over the 8×8 grid's 64 players
(:mod:`shapcore.players`). The deletion and insertion curves cost about a hundred model
evaluations more, so they are computed only when the request asks (``faithfulness=true``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapcore.background import BackgroundSet, summarize_background
from shapcore.errors import ShapserveError, UserError
from shapcore.explain.request import ExplainRequest
from shapcore.explain.result import attribution_fields
from shapcore.explainer_status import fit_command, read_fitting, refusal, summary
from shapcore.fastshap import BACKGROUND, EXPLAINER_FILE, FastExplainer, describe, load_explainer
from shapcore.jobs.artifact import pack_artifact
from shapcore.players import GRID_CELLS, grid_labels, grid_weights
from shapcore.registry import BACKGROUND as STORED_BACKGROUND

log = logging.getLogger(__name__)


class ExplainerSlot:
    """The explainer of one served version: loaded when its file appears or changes."""

    def __init__(self, folder: Path, version: str, class_names: list[str], min_rho: float = 0.8) -> None:
        self.path = folder / EXPLAINER_FILE
        self.folder = folder
        self.version = version
        self.min_rho = float(min_rho)
        self.class_names = list(class_names)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._explainer: FastExplainer | None = None
        self._error: str | None = None
        self._background: BackgroundSet | None = None

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """(Re)load when the file changed since the last look; cheap when it did not (one stat)."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            explainer, error = None, None
            if stamp is not None:
                try:
                    explainer = load_explainer(self.path, version=self.version, class_names=self.class_names)
                except UserError as exc:
                    error = str(exc)
                    log.warning("explainer of %s refused: %s", self.version, error)
            self._explainer, self._error, self._stamp = explainer, error, stamp

    def get(self) -> FastExplainer:
        """The explainer, or 409 saying why it is not served (none, unusable, unscored, below the
        floor, or being fitted)."""
        self.refresh()
        refused = refusal(self._explainer.meta, self.min_rho) if self._explainer is not None else None
        if self._explainer is not None and refused is None:
            return self._explainer
        fit = read_fitting(self.folder)
        if fit is not None:
            raise ShapserveError(
                409,
                "explainer_fitting",
                f"method=fast: the amortised explainer of {self.version} is being fitted ({fit.get('phase')}), about "
                f"{fit['minutes_left']} minute(s) left: `{fit_command(self.version, str(fit.get('data') or 'SRC'))}` "
                "is running and the service picks its explainer up when it ends; meanwhile use method=kernel",
                headers={"Retry-After": str(60 * fit["minutes_left"])},
                details=[{"figure": "minutes_left", "value": fit["minutes_left"],
                          "command": fit_command(self.version, str(fit.get("data") or "SRC"))}],
            )
        if refused is not None:
            code, message, details = refused
            raise ShapserveError(409, code, message, details=details)
        if self._error is not None:
            raise ShapserveError(409, "explainer_unusable", f"method=fast: {self._error}")
        raise ShapserveError(
            409,
            "no_explainer",
            f"method=fast needs an amortised explainer for model version {self.version}, and it has none: fit one "
            f"with `python -m training fit-explainer --version {self.version} --data SRC` (the running service "
            "picks it up), or use method=kernel",
        )

    def describe(self) -> dict[str, Any] | None:
        """What /model reports: the explainer's figures and whether it is served (or why not), or why
        it was refused; a fit in progress; None without a file or a fit."""
        self.refresh()
        fit = read_fitting(self.folder)
        fitting = {"fitting": {"phase": fit.get("phase"), "minutes_left": fit["minutes_left"]}} if fit else {}
        if self._explainer is not None:
            meta = self._explainer.meta
            refused = refusal(meta, self.min_rho)
            verdict = {"served": refused is None, "min_rho": self.min_rho}
            if refused is not None:
                verdict["refused"] = {"code": refused[0], "message": refused[1]}
            return {"available": True, **describe(meta), "quality": summary(meta.get("quality")), **verdict, **fitting}
        if self._error is not None:
            return {"available": False, "error": self._error, **fitting}
        return {"available": False, **fitting} if fit else None

    def background(self) -> BackgroundSet:
        """The ``mean`` background the explainer was trained against (for the faithfulness curves)."""
        if self._background is None:
            from safetensors.torch import load_file

            self._background = summarize_background(load_file(str(self.path.parent / STORED_BACKGROUND))["images"], 1)
        return self._background


class _LogProbabilities:
    """The served forward pass (probabilities) as the value function wants a model (logits):
    log-probabilities, whose softmax gives the same probabilities back."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward = forward

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).clamp_min(1e-30).log()


def explain_fast(
    explainer: FastExplainer,
    pixels: np.ndarray,
    model_input: torch.Tensor,
    probabilities: list[float],
    class_names: list[str],
    target: int | None,
    *,
    curves: tuple[Callable[[torch.Tensor], torch.Tensor], BackgroundSet] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """One explanation: (JSON-ready result, the heatmap's artifact).

    ``pixels``: the upload (H×W×3 uint8, the heatmap's picture); ``model_input``: uint8
    (3, 32, 32); ``probabilities``: the model's on it; ``curves``: (the forward pass, the background)
    to add the deletion and insertion curves.
    """
    started = time.perf_counter()
    fx = np.asarray(probabilities, dtype=np.float64)
    x = model_input.float().unsqueeze(0) / 255.0
    phi = explainer.explain(x, torch.tensor(fx, dtype=torch.float32).unsqueeze(0))[0].double().numpy()  # (64, C)
    explained = time.perf_counter()
    base = explainer.null.double().cpu().numpy()
    target = int(np.argmax(fx)) if target is None else int(target)
    m = explainer.players
    labels = grid_labels(pixels.shape[0], pixels.shape[1], GRID_CELLS)
    result: dict[str, Any] = {
        "method": "fast",
        "players": "grid",
        # efficient by construction: the residuals show float rounding only
        **attribution_fields(phi, base, fx, class_names, target, efficient=True),
        "convergence": None,
        "segments": {"requested": m, "count": m, "height": int(labels.shape[0]), "width": int(labels.shape[1])},
        "samples": 0,
        "samples_requested": 0,
        "samples_raised_to": None,
        "background": BACKGROUND,
        "background_images": 1,
        "seed": None,
        "explainer": {"fitted": explainer.meta.get("created"), "fit_seconds": explainer.meta.get("fit_seconds"),
                      "quality": summary(explainer.meta.get("quality"))},
        "model_evaluations": 1,
    }
    timings = {"segmentation": 0.0, "explainer": explained - started, "faithfulness": 0.0, "model_forward": 0.0}
    if curves is not None:
        from shapcore.faithfulness import faithfulness
        from shapcore.value import CoalitionModel

        forward, background = curves
        f = CoalitionModel(_LogProbabilities(forward), model_input, grid_weights(GRID_CELLS), background, fx=fx)
        result["faithfulness"] = faithfulness(f, phi[:, target], target, seed=0)
        result["faithfulness_evaluations"] = f.evaluations
        timings["faithfulness"] = time.perf_counter() - explained
        timings["model_forward"] = f.forward_seconds
    result["timings_s"] = timings
    result["duration_s"] = time.perf_counter() - started
    return result, pack_artifact(pixels, labels)


async def answer_fast(
    state: Any, request: ExplainRequest, upload: Any, decode: Callable[[Any], Any]
) -> tuple[Any, dict[str, Any], bytes]:
    """``method=fast`` for one upload: (the served version that answered, the result, the artifact).

    The probabilities come through the /predict batcher (one batched forward pass); the explainer
    and, with ``request.faithfulness``, the curves run on the decode pool, off the event loop."""
    import asyncio

    served = state.engine.current
    if served is None:
        raise ShapserveError(503, "model_not_ready", "the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(state.decode_executor, served.explainer.get)  # 409 before any work if none
    with state.batcher.expect(1):
        pixels, model_input = await decode(upload)
    model_input = torch.from_numpy(model_input)
    served, rows = await state.batcher.submit(model_input.unsqueeze(0))  # the version that answered
    if request.target is not None and request.target >= len(served.class_names):
        raise ShapserveError(422, "invalid_parameter", f"target {request.target} is not a class of {served.version}")

    def work() -> tuple[dict[str, Any], bytes]:  # off the event loop: the background is read from disk once
        extra = (served.forward, served.explainer.background()) if request.faithfulness else None
        return explain_fast(served.explainer.get(), pixels, model_input, rows[0], served.class_names,
                            request.target, curves=extra)  # fmt: skip

    result, artifact = await loop.run_in_executor(state.decode_executor, work)
    return served, result, artifact
