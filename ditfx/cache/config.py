"""Block caching's knobs: the config dataclasses (validated on construction) and their check against a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ditfx.cache.schedule import CacheSchedule
from ditfx.model_facts import ModelFacts
from ditfx.validation import WrongType, check_bool, check_choice, check_float, check_int, require, set_field

CacheMode = Literal["residual", "output"]
Forecast = Literal["none", "linear"]


def _check_mode(owner: str, mode: str) -> None:
    check_choice(owner, "mode", mode, ("residual", "output"),
                 f"{owner}.mode: cache mode must be 'residual' (reuse out - in, the DiT default) or 'output', "
                 f"got {mode!r}")


def _check_forecast(owner: str, forecast: str) -> None:
    check_choice(owner, "forecast", forecast, ("none", "linear"),
                 f"{owner}.forecast: cache forecast must be 'none' (reuse the cached value as it is) or 'linear' "
                 f"(extrapolate it from the block's last two computed steps), got {forecast!r}")


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

    threshold: float = 0.1  # chosen from ditfx.tune runs on the digits pipeline: docs/tune.md, "Defaults"
    first: int = 1
    last: int = 0
    warmup: int = 1
    max_reuse: int | None = None
    per_sample: bool = True
    mode: CacheMode = "residual"
    forecast: Forecast = "none"

    def __post_init__(self):
        o = "DynamicCache"
        set_field(self, "threshold", check_float(o, "threshold", self.threshold, 0, hint=" (0 never reuses)"))
        set_field(self, "first", check_int(o, "first", self.first, 1, hint=" (block first-1 is the probe)"))
        set_field(self, "last", check_int(o, "last", self.last, 0, hint=" (the number of last blocks that always run)"))
        set_field(self, "warmup", check_int(o, "warmup", self.warmup, 0, hint=" (initial steps that always compute)"))
        set_field(self, "max_reuse", check_int(o, "max_reuse", self.max_reuse, 1, none_ok=True,
                                          hint=" (consecutive reused steps; None: no limit)"))
        check_bool(o, "per_sample", self.per_sample)
        _check_mode(o, self.mode)
        _check_forecast(o, self.forecast)


@dataclass(frozen=True)
class StaticCache:
    """A calibrated schedule ("Cache Me if You Can"): a block reuses its residual until its accumulated change
    exceeds ``delta``.

    ``schedule`` (required) is a :class:`CacheSchedule` or the path of one written by ``ditfx calibrate``: per-block
    change rates over normalised time, so one calibration serves other step counts. ``delta = 0`` recomputes
    every block at every step (the exact limit). ``per_block=False`` (the default) gives the blocks one sum, of
    their mean change, so they recompute together at the same steps; ``per_block=True`` is the paper's rule, each
    block on its own. ``forecast="linear"`` (the default) extrapolates a reused value along the timestep from the
    block's last two computed steps; ``"none"`` reuses it unchanged. The defaults are the form that wins on the
    digits pipeline at the same quality, and ``delta``'s default is chosen from ditfx.tune runs there
    (docs/tune.md, "Defaults").
    """

    delta: float = 0.4  # chosen from ditfx.tune runs on the digits pipeline: docs/tune.md, "Defaults"
    schedule: CacheSchedule | str | Path | None = field(default=None, repr=False)
    mode: CacheMode | None = None  # None: the mode the schedule was calibrated in
    per_block: bool = False
    forecast: Forecast = "linear"

    def __post_init__(self):
        o = "StaticCache"
        if self.schedule is None:
            raise ValueError("StaticCache needs schedule=: a CacheSchedule from ditfx.calibrate or the path of one "
                             "written by 'ditfx calibrate'")
        set_field(self, "delta", check_float(o, "delta", self.delta, 0, hint=" (0 recomputes every step)"))
        if self.mode is not None:
            _check_mode(o, self.mode)
        check_bool(o, "per_block", self.per_block)
        _check_forecast(o, self.forecast)
        if isinstance(self.schedule, (str, Path)):
            set_field(self, "schedule", CacheSchedule.load(self.schedule))
        if not isinstance(self.schedule, CacheSchedule):
            raise WrongType("StaticCache.schedule must be a CacheSchedule or the path of a schedule JSON written by "
                            f"'ditfx calibrate', got {type(self.schedule).__name__}")
        if self.mode is None:
            set_field(self, "mode", self.schedule.mode)
        require(self.mode == self.schedule.mode,
               f"StaticCache.mode {self.mode!r} differs from the schedule's calibration mode "
               f"{self.schedule.mode!r}: calibrate again with --mode {self.mode}")


@dataclass(frozen=True)
class CacheCalibration:
    """Used by :func:`ditfx.calibrate`: run every block and record how much each block's cached value changes
    from step to step."""

    mode: CacheMode = "residual"

    def __post_init__(self):
        _check_mode("CacheCalibration", self.mode)


def check_model(cache: DynamicCache | StaticCache | CacheCalibration, module, facts: ModelFacts) -> None:
    """The checks of a cache config that need the model: a DynamicCache leaves middle blocks to skip; a
    StaticCache's schedule was calibrated for these blocks (paths, and the shapes of their weights when the
    schedule has a fingerprint). A model without repeated blocks passes (ditfx falls back to the inner compiler
    with a warning)."""
    n = len(facts.blocks)
    if isinstance(cache, DynamicCache) and n and cache.first + cache.last >= n:
        raise ValueError(
            f"DynamicCache(first={cache.first}, last={cache.last}) leaves no middle blocks to skip in a model "
            f"with {n} blocks: use first + last < {n}"
        )
    if isinstance(cache, StaticCache):
        cache.schedule.check_model(list(facts.blocks), module, ordered=False)  # the plan checks the run order
