"""What an explanation may be asked for, checked in one place: :class:`ExplainRequest`.

The API builds one from its form fields, the report (``python -m training report``) and
``bench/`` from their options, and the worker receives it inside the queued job
(:class:`shapcore.jobs.queue.JobRequest`). Every rule lives in :meth:`ExplainRequest.build`:
the method and its bound players and background, the integer ranges (from the settings),
the sample floor and the evaluation limit, the target's range.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from shapcore.explain.background import STORED_BACKGROUND, parse_background
from shapcore.explain.layouts import GRID_PLAYERS, PLAYER_LAYOUTS
from shapcore.explain.methods import DEFAULT_METHOD, Method, get_method


class RequestLimits(Protocol):
    """What :meth:`ExplainRequest.build` reads from the settings (``ExplainSettings`` has it)."""

    explain_default_segments: int
    explain_default_samples: int | Literal["auto"]
    explain_auto_cap: int
    explain_default_background: str
    explain_default_seed: int
    explain_max_evaluations: int
    explain_slic_compactness: float

    def ranges(self) -> dict[str, tuple[int, int]]: ...


class InvalidRequest(ValueError):
    """A request that breaks a rule; ``field`` names the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def min_samples(players: int) -> int:
    """The fewest coalitions KernelSHAP may use for ``players`` players: four per player.

    shap draws a coalition and its complement together, so S samples make about S/2
    independent draws; the weighted regression has M − 1 free values once efficiency fixes
    the last, and the bootstrap standard errors (:mod:`worker.uncertainty`) need about 2M
    draws to be calibrated (BENCHMARKS.md: at 2M samples they came out 0.55–0.6× the
    seed-to-seed spread). shap's own "auto" is 2M + 2048."""
    return 4 * int(players)


class ExplainRequest(BaseModel):
    """One explanation's parameters, normalised: what the worker runs and the dedupe key hashes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(DEFAULT_METHOD, description="The method (shapcore.explain.methods).")
    players: str = Field("slic", description="slic (superpixels) or grid (the 8x8 cells).")
    segments: int = Field(description="Players asked for (the grid: always 64).")
    samples: int | Literal["auto"] = Field(description="Coalitions of the sampled methods: a budget, or auto (stop "
                                           "when converged, within samples_cap).")
    samples_cap: int = Field(5000, description="samples=auto: the most coalitions (the methods without rounds "
                             "spend it).")
    background: str = Field(description="The background's canonical name (mean, blur, train:K, kmeans:K).")
    seed: int = Field(description="Seed of the coalition sampling.")
    target: int | None = Field(None, description="Class index explained; None: the top-1 prediction.")
    faithfulness: bool = Field(False, description="Inline methods: also compute the deletion/insertion curves.")
    slic_compactness: float = Field(10.0, description="SLIC compactness (a setting, so the key and the work agree).")

    @classmethod
    def build(cls, limits: RequestLimits, *, class_count: int | None = None, **given: Any) -> ExplainRequest:
        """A checked request from the fields ``given`` (absent or None: the settings' defaults).

        Raises :class:`InvalidRequest` naming the field and the rule. ``class_count`` bounds
        ``target`` when known.
        """
        given = {k: v for k, v in given.items() if v is not None or k == "target"}
        method = _method(str(given.get("method", DEFAULT_METHOD)).lower())
        players = _players(method, given.get("players"))
        ranges = limits.ranges()
        segments = GRID_PLAYERS if players == "grid" else _bounded(
            "segments", given.get("segments", limits.explain_default_segments), ranges)  # fmt: skip
        samples = _samples(given.get("samples", limits.explain_default_samples), ranges)
        cap = int(limits.explain_auto_cap)
        budget = cap if samples == "auto" else samples
        seed = _bounded("seed", given.get("seed", limits.explain_default_seed), ranges)
        background = _background(method, given.get("background"), limits.explain_default_background)
        spec = parse_background(background, STORED_BACKGROUND)
        if method.sampled and budget < min_samples(segments):
            raise InvalidRequest("samples", f"samples={budget} is too few for segments={segments}: {method.name} "
                                 f"needs at least {min_samples(segments)} (4 x segments; shap's own default is "
                                 "2 x segments + 2048)")  # fmt: skip
        evaluations = budget * spec.count
        if method.sampled and evaluations > limits.explain_max_evaluations:
            raise InvalidRequest("samples", f"samples x background images = {budget} x {spec.count} = "
                                 f"{evaluations} model evaluations, over the limit of "
                                 f"{limits.explain_max_evaluations}: lower samples or background")  # fmt: skip
        target = given.get("target")
        if target is not None and (not isinstance(target, int) or target < 0
                                   or (class_count is not None and target >= class_count)):  # fmt: skip
            top = f" to {class_count - 1}" if class_count else ""
            raise InvalidRequest("target", f"target must be a class index from 0{top} (got {target!r})")
        return cls(method=method.name, players=players, segments=segments, samples=samples, samples_cap=cap,
                   background=spec.name, seed=seed, target=target, faithfulness=bool(given.get("faithfulness")),
                   slic_compactness=float(given.get("slic_compactness", limits.explain_slic_compactness)))  # fmt: skip

    @property
    def auto(self) -> bool:
        """``samples=auto``: sample in rounds until converged (where the method can), within the cap."""
        return self.samples == "auto"

    @property
    def budget(self) -> int:
        """The coalitions to spend, or at most (``auto``)."""
        return self.samples_cap if self.samples == "auto" else int(self.samples)

    def params(self) -> dict[str, Any]:
        """The fields as the dedupe key and the job's ``parameters`` show them."""
        return self.model_dump()


def _method(name: str) -> Method:
    try:
        return get_method(name)
    except ValueError as exc:
        raise InvalidRequest("method", str(exc)) from None


def _players(method: Method, raw: Any) -> str:
    if raw is None:
        return method.players or "slic"
    players = str(raw).strip().lower()
    if players not in PLAYER_LAYOUTS:
        raise InvalidRequest("players", f"players must be one of {', '.join(PLAYER_LAYOUTS)} (got {str(raw)[:40]!r})")
    if method.players is not None and players != method.players:
        raise InvalidRequest("players", f"method={method.name} values the {method.players} layout's players: "
                             f"players={players} is not available for it")  # fmt: skip
    return players


def _background(method: Method, raw: Any, default: str) -> str:
    if method.background is not None:
        if raw is not None and parse_background(raw, STORED_BACKGROUND).name != method.background:
            raise InvalidRequest("background", f"method={method.name} uses the {method.background} background "
                                 f"only (got {str(raw)[:40]!r})")  # fmt: skip
        return method.background
    try:
        return parse_background(default if raw is None else raw, STORED_BACKGROUND).name
    except ValueError as exc:
        raise InvalidRequest("background", str(exc)) from None


def _samples(value: Any, ranges: dict[str, tuple[int, int]]) -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    lo, hi = ranges["samples"]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest("samples", f"samples must be auto or an integer from {lo} to {hi} (got {value!r})")
    return value


def _bounded(name: str, value: Any, ranges: dict[str, tuple[int, int]]) -> int:
    lo, hi = ranges[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(name, f"{name} must be an integer from {lo} to {hi} (got {value!r})")
    return value
