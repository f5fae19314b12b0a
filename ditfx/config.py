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


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _check_mode(mode: str) -> None:
    _check(mode in ("residual", "output"),
           f"cache mode must be 'residual' (reuse out - in, the DiT default) or 'output', got {mode!r}")


@dataclass(frozen=True)
class DynamicCache:
    """Skip the middle blocks while the first blocks' residual barely changes (FBCache-style, online).

    The first ``first`` blocks and the last ``last`` blocks always run. After block ``first - 1`` runs, the
    relative L1 change of its residual against its residual at the last fully computed step decides: below
    ``threshold`` the middle blocks reuse their cached residuals. ``warmup`` initial steps always compute,
    and at most ``max_reuse`` consecutive steps reuse (None: no limit). ``per_sample`` decides for each
    sample of a batch on its own (a batched CFG call's halves never mix); otherwise one decision per batch.
    """

    threshold: float
    first: int = 1
    last: int = 0
    warmup: int = 1
    max_reuse: int | None = None
    per_sample: bool = True
    mode: CacheMode = "residual"

    def __post_init__(self):
        _check(self.threshold >= 0, f"DynamicCache.threshold must be >= 0 (0 never reuses), got {self.threshold}")
        _check(self.first >= 1, f"DynamicCache.first must be >= 1: block first-1 is the probe, got {self.first}")
        _check(self.last >= 0, f"DynamicCache.last must be >= 0, got {self.last}")
        _check(self.warmup >= 0, f"DynamicCache.warmup must be >= 0 steps, got {self.warmup}")
        _check(self.max_reuse is None or self.max_reuse >= 1,
               f"DynamicCache.max_reuse must be None or >= 1, got {self.max_reuse}")
        _check_mode(self.mode)


@dataclass(frozen=True)
class StaticCache:
    """The paper's schedule: block i reuses its residual until its accumulated change exceeds ``delta``.

    ``schedule`` is a :class:`CacheSchedule` or the path of one written by ``ditfx calibrate``: per-block
    change rates over normalised time, so one calibration serves other step counts. ``delta = 0`` recomputes
    every block at every step (the exact limit).
    """

    delta: float
    schedule: CacheSchedule | str | Path = field(repr=False)
    mode: CacheMode | None = None  # None: the mode the schedule was calibrated in

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


@dataclass(frozen=True)
class CacheCalibration:
    """Used by :func:`ditfx.calibrate`: run every block and record how much each block's cached value changes
    from step to step."""

    mode: CacheMode = "residual"

    def __post_init__(self):
        _check_mode(self.mode)


CACHE_KINDS = (DynamicCache, StaticCache, CacheCalibration)


@dataclass(frozen=True)
class Config:
    """What ditfx does to a model.

    ``compiler`` is the inner backend that compiles the regions. ``compile_regions="blocks"`` compiles the
    repeated blocks (one artifact per block structure) and runs the small prologue and epilogue as their
    captured FX graphs, as regional compilation does, which keeps the first call's compile time at that of
    compiling one block; ``"all"`` compiles the prologue and epilogue too (two more compiles).
    """

    cache: DynamicCache | StaticCache | CacheCalibration | None = None
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
        return cls(**options)
