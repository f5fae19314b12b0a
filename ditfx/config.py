"""User configuration: frozen dataclasses, one per technique, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ditfx.runtime.schedule import CacheSchedule

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILED_REGIONS = ("blocks", "all")
CacheMode = Literal["residual", "output"]
Forecast = Literal["none", "linear"]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _check_mode(mode: str) -> None:
    _check(mode in ("residual", "output"),
           f"cache mode must be 'residual' (reuse out - in, the DiT default) or 'output', got {mode!r}")


def _check_forecast(forecast: str) -> None:
    _check(forecast in ("none", "linear"),
           f"cache forecast must be 'none' (reuse the cached value as it is) or 'linear' (extrapolate it from "
           f"the block's last two computed steps), got {forecast!r}")


@dataclass(frozen=True)
class DynamicCache:
    """Skip the middle blocks while the first blocks' residual barely changes (FBCache-style, online).

    The first ``first`` blocks and the last ``last`` blocks always run. After block ``first - 1`` runs, the
    relative L1 change of its residual against its residual at the last fully computed step decides: below
    ``threshold`` the middle blocks reuse their cached residuals. ``warmup`` initial steps always compute,
    and at most ``max_reuse`` consecutive steps reuse (None: no limit). ``per_sample`` decides for each
    sample of a batch on its own (a batched CFG call's halves never mix); otherwise one decision per batch.
    ``forecast="linear"`` extrapolates a reused value along the timestep from the block's last two computed
    steps (first-order, as TaylorSeer) instead of reusing it unchanged.
    """

    threshold: float
    first: int = 1
    last: int = 0
    warmup: int = 1
    max_reuse: int | None = None
    per_sample: bool = True
    mode: CacheMode = "residual"
    forecast: Forecast = "none"

    def __post_init__(self):
        _check(self.threshold >= 0, f"DynamicCache.threshold must be >= 0 (0 never reuses), got {self.threshold}")
        _check(self.first >= 1, f"DynamicCache.first must be >= 1: block first-1 is the probe, got {self.first}")
        _check(self.last >= 0, f"DynamicCache.last must be >= 0, got {self.last}")
        _check(self.warmup >= 0, f"DynamicCache.warmup must be >= 0 steps, got {self.warmup}")
        _check(self.max_reuse is None or self.max_reuse >= 1,
               f"DynamicCache.max_reuse must be None or >= 1, got {self.max_reuse}")
        _check_mode(self.mode)
        _check_forecast(self.forecast)


@dataclass(frozen=True)
class StaticCache:
    """The paper's schedule: block i reuses its residual until its accumulated change exceeds ``delta``.

    ``schedule`` is a :class:`CacheSchedule` or the path of one written by ``ditfx calibrate``: per-block
    change rates over normalised time, so one calibration serves other step counts. ``delta = 0`` recomputes
    every block at every step (the exact limit). ``per_block=False`` gives the blocks one sum, of their mean
    change, so they recompute together at the same steps. ``forecast="linear"`` extrapolates a reused value
    along the timestep from the block's last two computed steps instead of reusing it unchanged.
    """

    delta: float
    schedule: CacheSchedule | str | Path = field(repr=False)
    mode: CacheMode | None = None  # None: the mode the schedule was calibrated in
    per_block: bool = True
    forecast: Forecast = "none"

    def __post_init__(self):
        _check(self.delta >= 0, f"StaticCache.delta must be >= 0 (0 recomputes every step), got {self.delta}")
        if isinstance(self.schedule, (str, Path)):
            object.__setattr__(self, "schedule", CacheSchedule.load(self.schedule))
        _check(isinstance(self.schedule, CacheSchedule),
               "StaticCache.schedule must be a CacheSchedule or the path of a schedule JSON written by "
               f"'ditfx calibrate', got {type(self.schedule).__name__}")
        if self.mode is None:
            object.__setattr__(self, "mode", self.schedule.mode)
        _check_mode(self.mode)
        _check(self.mode == self.schedule.mode,
               f"StaticCache.mode {self.mode!r} differs from the schedule's calibration mode "
               f"{self.schedule.mode!r}: calibrate again with --mode {self.mode}")
        _check(isinstance(self.per_block, bool), f"StaticCache.per_block must be True or False, got {self.per_block!r}")
        _check_forecast(self.forecast)


@dataclass(frozen=True)
class CacheCalibration:
    """Used by :func:`ditfx.calibrate`: run every block and record how much each block's cached value changes
    from step to step."""

    mode: CacheMode = "residual"

    def __post_init__(self):
        _check_mode(self.mode)


CACHE_KINDS = (DynamicCache, StaticCache, CacheCalibration)


def _check_layout(uncond_first: bool) -> None:
    _check(isinstance(uncond_first, bool), f"uncond_first must be True or False, got {uncond_first!r}")


@dataclass(frozen=True)
class AdaptiveGuidance:
    """Adaptive Guidance (Castillo et al.): stop classifier-free guidance once it stops mattering.

    On full-guidance steps the cosine similarity of the conditional and unconditional predictions is computed
    per sample; from the first step where it reaches ``gamma``, that sample's unconditional branch is not
    evaluated for the rest of the generation and its slot is filled from the conditional prediction (``fill``),
    so an unchanged pipeline's ``u + s * (c - u)`` still works. ``gamma = 1`` never switches (exact CFG);
    ``gamma = -1`` switches after the first step. ``per_sample=False`` switches a batch when every sample has
    reached gamma. ``uncond_first`` gives the layout of batched calls (diffusers pipelines put the unconditional
    half first) and the order of two-call steps. ``warmup``: the fraction of the generation (progress
    ``1 - t / t_first``) during which no sample switches; 0 is the paper's rule. At high noise the two
    predictions of some samples already agree before guidance has shaped them, which a warm-up ignores.
    ``fill``: what a switched sample's unconditional slot holds: ``"delta"`` (the default), the conditional
    prediction minus the guidance direction ``c - u`` of the sample's last full step scaled by ``t / t_switch``,
    so ``u + s * (c - u)`` keeps a guidance that fades linearly to zero at t = 0; or ``"cond"``, the conditional
    prediction itself (the paper: guidance ends at once and the combine yields exactly ``c``). The default is
    ``"delta"`` because ending guidance at once moves the output distribution: on the digits model ``"cond"``
    lowers digits-FD by a quarter at the default gamma, ``"delta"`` keeps it within 5 % (docs/guidance.md).
    """

    gamma: float = 0.99
    per_sample: bool = True
    uncond_first: bool = True
    warmup: float = 0.0
    fill: Literal["cond", "delta"] = "delta"

    def __post_init__(self):
        _check(-1.0 <= self.gamma <= 1.0, f"AdaptiveGuidance.gamma is a cosine in [-1, 1], got {self.gamma}")
        _check(0.0 <= self.warmup < 1.0, f"AdaptiveGuidance.warmup is a fraction of the generation in [0, 1), "
                                         f"got {self.warmup}")
        _check(self.fill in ("cond", "delta"),
               f"AdaptiveGuidance.fill must be 'cond' (guidance ends) or 'delta' (the last measured guidance "
               f"direction, fading to zero at t = 0), got {self.fill!r}")
        _check_layout(self.uncond_first)


@dataclass(frozen=True)
class GuidanceWindow:
    """Classifier-free guidance only while the generation's progress ``1 - t / t_first`` is in [start, stop):
    diffusers' guiders' static window. Outside it the unconditional branch is not evaluated."""

    start: float = 0.0
    stop: float = 1.0
    uncond_first: bool = True

    def __post_init__(self):
        _check(0.0 <= self.start <= self.stop <= 1.0,
               f"GuidanceWindow needs 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}")
        _check_layout(self.uncond_first)


@dataclass(frozen=True)
class LinearAG:
    """LinearAG: in the first half of the steps, exact guidance steps alternate with steps whose unconditional
    prediction is a least-squares affine combination of past predictions (coefficients per step, fitted by
    ``ditfx calibrate-guidance``); the second half is conditional only.

    ``coefficients`` is a :class:`~ditfx.runtime.linear_ag.LinearAGCoefficients` or the path of its JSON.
    """

    coefficients: Any = field(repr=False)
    uncond_first: bool = True

    def __post_init__(self):
        from ditfx.runtime.linear_ag import LinearAGCoefficients

        if isinstance(self.coefficients, (str, Path)):
            object.__setattr__(self, "coefficients", LinearAGCoefficients.load(self.coefficients))
        _check(isinstance(self.coefficients, LinearAGCoefficients),
               "LinearAG.coefficients must be LinearAGCoefficients or the path of a JSON written by "
               f"'ditfx calibrate-guidance', got {type(self.coefficients).__name__}")
        _check_layout(self.uncond_first)


@dataclass(frozen=True)
class GuidanceRecording:
    """Used by :func:`ditfx.calibrate_guidance`: run full guidance and record both predictions per step."""

    uncond_first: bool = True


GUIDANCE_KINDS = (AdaptiveGuidance, GuidanceWindow, LinearAG, GuidanceRecording)


@dataclass(frozen=True)
class Config:
    """What ditfx does to a model.

    ``compiler`` is the inner backend that compiles the regions. ``compile_regions="blocks"`` compiles the
    repeated blocks (one artifact per block structure) and runs the small prologue and epilogue as their
    captured FX graphs, as regional compilation does, which keeps the first call's compile time at that of
    compiling one block; ``"all"`` compiles the prologue and epilogue too (two more compiles).
    """

    cache: DynamicCache | StaticCache | CacheCalibration | None = None
    guidance: AdaptiveGuidance | GuidanceWindow | LinearAG | GuidanceRecording | None = None
    compiler: str = "inductor"
    compile_regions: str = "blocks"
    kernels: bool = False  # lower adaLN / gated-residual patterns to torch.ops.ditfx kernels (passes/fusion.py)

    def __post_init__(self):
        _check(isinstance(self.kernels, bool), f"Config.kernels must be True or False, got {self.kernels!r}")
        _check(self.compiler in INNER_BACKENDS,
               f"unknown inner backend {self.compiler!r}: use one of {', '.join(INNER_BACKENDS)}")
        _check(self.compile_regions in COMPILED_REGIONS,
               f"Config.compile_regions must be one of {COMPILED_REGIONS}, got {self.compile_regions!r}")
        _check(self.cache is None or isinstance(self.cache, CACHE_KINDS),
               f"Config.cache must be ditfx.DynamicCache, ditfx.StaticCache or None, got {self.cache!r}")
        _check(self.guidance is None or isinstance(self.guidance, GUIDANCE_KINDS),
               "Config.guidance must be ditfx.AdaptiveGuidance, ditfx.LinearAG, ditfx.GuidanceWindow or None, "
               f"got {self.guidance!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Config:
        """Build from ``torch.compile(..., backend="ditfx", options={...})``.

        Accepts ``{"config": Config}`` or plain fields: ``{"compiler": "aot_eager",
        "cache": {"kind": "dynamic", "threshold": 0.1}}``.
        """
        options = dict(options or {})
        if "config" in options:
            config = options.pop("config")
            _check(not options, f"pass either 'config' or fields, not both: {sorted(options)}")
            _check(isinstance(config, Config), f"options['config'] must be a ditfx.Config, got {config!r}")
            return config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        _check(not unknown, f"unknown ditfx option(s) {sorted(unknown)}; known: {sorted(known)}")
        cache = options.get("cache")
        if isinstance(cache, dict):
            cache = dict(cache)
            kind = cache.pop("kind", "dynamic")
            _check(kind in ("dynamic", "static"), f"cache kind must be 'dynamic' or 'static', got {kind!r}")
            options["cache"] = (DynamicCache if kind == "dynamic" else StaticCache)(**cache)
        guidance = options.get("guidance")
        if isinstance(guidance, dict):
            guidance = dict(guidance)
            kinds = {"adaptive": AdaptiveGuidance, "window": GuidanceWindow, "linear": LinearAG}
            kind = guidance.pop("kind", "adaptive")
            _check(kind in kinds, f"guidance kind must be one of {sorted(kinds)}, got {kind!r}")
            options["guidance"] = kinds[kind](**guidance)
        return cls(**options)
