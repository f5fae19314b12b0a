"""What ditfx.tune searches: knobs, each an ordered list of values from its exact limit to its most aggressive, and
the builder that turns one value per knob into a :class:`~ditfx.config.Config`.

Every knob's first value is its technique's exact limit (off), so the space's origin is the exact configuration
and a technique is "on or off" by where its knob stands. Quality is assumed to fall (and speed to rise) along a
knob, which the search uses to bisect; combinations are searched together (search.py).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditfx.budget.config import TokenBudget
from ditfx.cache.config import DynamicCache, StaticCache
from ditfx.cache.schedule import CacheSchedule
from ditfx.config import Config
from ditfx.guidance.config import AdaptiveGuidance

DELTAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2)
THRESHOLDS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)
GAMMAS = (1.0, 0.999, 0.998, 0.997, 0.995, 0.99, 0.98, 0.97, 0.95)
FLOPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@dataclass(frozen=True)
class Knob:
    """One dimension: ``values[0]`` is the exact limit, later values are ever more aggressive."""

    name: str
    values: tuple

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Knob.name must be a non-empty string, got {self.name!r}")
        values = tuple(self.values)
        if len(values) < 2:
            raise ValueError(f"Knob {self.name!r} needs its exact value and at least one more, got {values}")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"Knob {self.name!r} repeats a value: {values}")
        object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class Space:
    """Knobs searched together, and ``build({knob: value}) -> Config`` (which must give the exact configuration
    at every knob's first value). ``name`` tells spaces apart in reports and in a resumed search.

    ``choices``: settings that change quality but not speed (``{"fade": (1.0, 2.0)}``), passed to ``build`` with
    the knobs; the search tries each with every knob alone and keeps the one whose knobs reach furthest.

    ``starts``: known configurations (``{knob: value}``, values on the knobs' grids, knobs left out at their exact
    value) the greedy ascent also climbs from when they are inside the budget, so the result is never slower than
    a known-good configuration that holds (the ascent from the exact point alone can settle on a knob that spends
    the budget early, where two knobs whose effects cancel would have gone further)."""

    name: str
    knobs: tuple[Knob, ...]
    build: Callable[[dict[str, Any]], Config] = field(repr=False)
    choices: dict = field(default_factory=dict)
    starts: tuple = ()

    def __post_init__(self):
        knobs = tuple(self.knobs)
        if not knobs or not all(isinstance(k, Knob) for k in knobs):
            raise ValueError(f"Space {self.name!r} needs at least one ditfx.tuning.Knob")
        names = [k.name for k in knobs]
        if len(set(names)) != len(names):
            raise ValueError(f"Space {self.name!r} has two knobs of one name: {names}")
        if not callable(self.build):
            raise TypeError(f"Space {self.name!r}: build must be a callable {{knob: value}} -> ditfx.Config")
        object.__setattr__(self, "knobs", knobs)
        starts = tuple(dict(start) for start in self.starts)
        for start in starts:
            for name, value in start.items():
                knob = next((k for k in knobs if k.name == name), None)
                if knob is None or value not in knob.values:
                    raise ValueError(f"Space {self.name!r}: start {start} sets {name}={value!r}, which is not "
                                     f"{'a knob' if knob is None else 'on the knob grid ' + repr(knob.values)}")
        object.__setattr__(self, "starts", starts)

    def variants(self) -> list[Space]:
        """This space once per combination of its choices (itself when it has none)."""
        combos = itertools.product(*self.choices.values())
        return [self.fixed(dict(zip(self.choices, c))) for c in combos] if self.choices else [self]

    def fixed(self, choice: dict[str, Any]) -> Space:
        """This space with its choices set: a space of knobs only."""
        label = ",".join(f"{k}={v!r}" for k, v in choice.items())
        return Space(f"{self.name}[{label}]", self.knobs, lambda v: self.build({**v, **choice}), starts=self.starts)

    def point(self, values: dict[str, Any]) -> tuple[int, ...]:
        """The grid point of ``{knob: value}`` (knobs left out at their exact value)."""
        return tuple(k.values.index(values[k.name]) if k.name in values else 0 for k in self.knobs)

    def values(self, point: Sequence[int]) -> dict[str, Any]:
        return {k.name: k.values[i] for k, i in zip(self.knobs, point)}

    def config(self, point: Sequence[int]) -> Config:
        config = self.build(self.values(point))
        if not isinstance(config, Config):
            raise TypeError(f"Space {self.name!r}: build returned {type(config).__name__}, not a ditfx.Config")
        return config



def techniques(cache: str | None = "static", schedule=None, guidance: bool = True, adapter=None,
               deltas: Sequence[float] = DELTAS, thresholds: Sequence[float] = THRESHOLDS,
               gammas: Sequence[float] = GAMMAS, flops: Sequence[float] = FLOPS, fades: Sequence[float] = (1.0,),
               starts: Sequence[dict] = ()) -> Space:
    """The standard space: a block cache, Adaptive Guidance and a token budget, each on or off and every
    combination of them.

    * ``cache="static"`` (needs ``schedule``, a :class:`~ditfx.CacheSchedule` or its path from ``ditfx.calibrate``):
      ``StaticCache(delta, schedule, per_block=False, forecast="linear")``, knob ``delta``; ``"dynamic"``:
      ``DynamicCache(threshold)``, knob ``threshold``; None: no cache;
    * ``guidance``: ``AdaptiveGuidance(gamma, fade=...)`` (``fill="delta"``), knob ``gamma``; only for pipelines
      with classifier-free guidance; ``fades`` with more than one value is a choice (how fast a switched sample's
      guidance fades; its best value depends on the guidance scale, docs/guidance.md);
    * ``adapter``: a token-budget adapter (``ditfx.budget.distill``): ``TokenBudget(adapter, flops=f)``, knob
      ``flops``; None: no token budget (the zero-shot weak mode is too coarse to tune by default);
    * ``starts``: known configurations the ascent also climbs from (:class:`Space`).
    """
    knobs = []
    if cache == "static":
        if schedule is None:
            raise ValueError("techniques(cache='static') needs schedule= (ditfx.calibrate's CacheSchedule or its "
                             "path); ditfx.tune calibrates one when it builds the default space")
        if isinstance(schedule, (str, Path)):
            schedule = CacheSchedule.load(schedule)  # read once, not per point
        knobs.append(Knob("delta", deltas))
    elif cache == "dynamic":
        knobs.append(Knob("threshold", thresholds))
    elif cache is not None:
        raise ValueError(f"techniques: cache must be 'static', 'dynamic' or None, got {cache!r}")
    if guidance:
        knobs.append(Knob("gamma", gammas))
    if adapter is not None:
        knobs.append(Knob("flops", flops))
    if not knobs:
        raise ValueError("techniques: nothing to tune (no cache, no guidance, no adapter)")

    def build(v: dict[str, Any]) -> Config:
        cache_config = None
        if v.get("delta", 0) > 0:
            cache_config = StaticCache(v["delta"], schedule, per_block=False, forecast="linear")
        elif v.get("threshold", 0) > 0:
            cache_config = DynamicCache(v["threshold"])
        gamma = v.get("gamma", 1.0)
        fraction = v.get("flops", 1.0)
        guide = AdaptiveGuidance(gamma, fade=v.get("fade", fades[0])) if gamma < 1 else None
        return Config(cache=cache_config, guidance=guide,
                      budget=TokenBudget(adapter=adapter, flops=fraction) if fraction < 1 else None,
                      compiler="eager")

    name = "+".join([cache or "", "guidance" if guidance else "", "budget" if adapter is not None else ""])
    choices = {"fade": tuple(fades)} if guidance and len(fades) > 1 else {}
    return Space(name.strip("+").replace("++", "+"), tuple(knobs), build, choices, starts=tuple(starts))
