"""User configuration: frozen dataclasses, one per technique, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ditfx.runtime.schedule import CacheSchedule
from ditfx.validation import WrongType, check_bool, check_choice, check_float, check_int

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILED_REGIONS = ("blocks", "all")
CacheMode = Literal["residual", "output"]
Forecast = Literal["none", "linear"]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _set(obj, name: str, value) -> None:
    """Store a checked (normalised) value on a frozen dataclass."""
    object.__setattr__(obj, name, value)


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
        _set(self, "threshold", check_float(o, "threshold", self.threshold, 0, hint=" (0 never reuses)"))
        _set(self, "first", check_int(o, "first", self.first, 1, hint=" (block first-1 is the probe)"))
        _set(self, "last", check_int(o, "last", self.last, 0, hint=" (the number of last blocks that always run)"))
        _set(self, "warmup", check_int(o, "warmup", self.warmup, 0, hint=" (initial steps that always compute)"))
        _set(self, "max_reuse", check_int(o, "max_reuse", self.max_reuse, 1, none_ok=True,
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
        _set(self, "delta", check_float(o, "delta", self.delta, 0, hint=" (0 recomputes every step)"))
        if self.mode is not None:
            _check_mode(o, self.mode)
        check_bool(o, "per_block", self.per_block)
        _check_forecast(o, self.forecast)
        if isinstance(self.schedule, (str, Path)):
            _set(self, "schedule", CacheSchedule.load(self.schedule))
        if not isinstance(self.schedule, CacheSchedule):
            raise WrongType("StaticCache.schedule must be a CacheSchedule or the path of a schedule JSON written by "
                            f"'ditfx calibrate', got {type(self.schedule).__name__}")
        if self.mode is None:
            _set(self, "mode", self.schedule.mode)
        _check(self.mode == self.schedule.mode,
               f"StaticCache.mode {self.mode!r} differs from the schedule's calibration mode "
               f"{self.schedule.mode!r}: calibrate again with --mode {self.mode}")


@dataclass(frozen=True)
class CacheCalibration:
    """Used by :func:`ditfx.calibrate`: run every block and record how much each block's cached value changes
    from step to step."""

    mode: CacheMode = "residual"

    def __post_init__(self):
        _check_mode("CacheCalibration", self.mode)


CACHE_KINDS = (DynamicCache, StaticCache, CacheCalibration)


def _check_layout(owner: str, uncond_first: bool | None) -> None:
    check_bool(owner, "uncond_first", uncond_first, none_ok=True,
               hint=" (None: determine the layout automatically)")


@dataclass(frozen=True)
class AdaptiveGuidance:
    """Adaptive Guidance (Castillo et al.): stop classifier-free guidance once it stops mattering.

    On full-guidance steps the cosine similarity of the conditional and unconditional predictions is computed
    per sample; from the first step where it reaches ``gamma``, that sample's unconditional branch is not
    evaluated for the rest of the generation and its slot is filled from the conditional prediction (``fill``),
    so an unchanged pipeline's ``u + s * (c - u)`` still works. ``gamma = 1`` never switches (exact CFG);
    ``gamma = -1`` switches after the first step. ``per_sample=False`` switches a batch when every sample has
    reached gamma. ``uncond_first`` gives the layout of batched calls (where the unconditional half is) and the
    order of two-call steps: ``None`` (the default) determines it from the pipeline's ``cache_context`` names,
    the model's null class, or the data; ``True`` / ``False`` states it (unconditional first, or second).
    ``warmup``: the fraction of the generation (progress
    ``1 - t / t_first``) during which no sample switches; 0 is the paper's rule. At high noise the two
    predictions of some samples already agree before guidance has shaped them, which a warm-up ignores.
    ``fill``: what a switched sample's unconditional slot holds: ``"delta"`` (the default), the conditional
    prediction minus the guidance direction ``c - u`` of the sample's last full step scaled by
    ``(t / t_switch) ** fade``, so ``u + s * (c - u)`` keeps a guidance that fades to zero at t = 0; or ``"cond"``,
    the conditional prediction itself (the paper: guidance ends at once and the combine yields exactly ``c``).
    ``fade``: how fast that direction fades (1: linearly in t; 0: it stays; larger: faster). Full CFG's own
    direction decays like ``t ** 1.1`` at guidance scale 1.5 and ``t ** 2`` at 4 on the digits model, so the best
    fade grows with the scale; ``ditfx.tune`` chooses it (docs/guidance.md, docs/tune.md). The default is
    ``"delta"`` because ending guidance at once moves the output distribution: on the digits model ``"cond"``
    lowers digits-FD by a quarter at the default gamma, ``"delta"`` keeps it within 5 % (docs/guidance.md).
    """

    gamma: float = 0.99
    per_sample: bool = True
    uncond_first: bool | None = None
    warmup: float = 0.0
    fill: Literal["cond", "delta"] = "delta"
    fade: float = 1.0

    def __post_init__(self):
        o = "AdaptiveGuidance"
        _set(self, "gamma", check_float(o, "gamma", self.gamma))
        _check(-1.0 <= self.gamma <= 1.0, f"AdaptiveGuidance.gamma is a cosine in [-1, 1], got {self.gamma}")
        check_bool(o, "per_sample", self.per_sample)
        _check_layout(o, self.uncond_first)
        _set(self, "warmup", check_float(o, "warmup", self.warmup))
        _check(0.0 <= self.warmup < 1.0, f"AdaptiveGuidance.warmup is a fraction of the generation in [0, 1), "
                                         f"got {self.warmup}")
        check_choice(o, "fill", self.fill, ("cond", "delta"),
                     f"AdaptiveGuidance.fill must be 'cond' (guidance ends) or 'delta' (the last measured guidance "
                     f"direction, fading to zero at t = 0), got {self.fill!r}")
        _set(self, "fade", check_float(o, "fade", self.fade, 0, hint=" (0 keeps the direction, 1 fades it linearly)"))


@dataclass(frozen=True)
class GuidanceWindow:
    """Classifier-free guidance only while the generation's progress ``1 - t / t_first`` is in [start, stop):
    diffusers' guiders' static window. Outside it the unconditional branch is not evaluated.

    ``uncond_first``: the layout of the two guidance branches (in a batched call, whether the unconditional half
    comes first; with two calls per step, whether the unconditional call comes first). ``None`` (the default):
    determined from the pipeline's ``cache_context`` names, the model's null class, or the data; ``True`` /
    ``False``: the caller states it.
    """

    start: float = 0.0
    stop: float = 1.0
    uncond_first: bool | None = None

    def __post_init__(self):
        o = "GuidanceWindow"
        _set(self, "start", check_float(o, "start", self.start))
        _set(self, "stop", check_float(o, "stop", self.stop))
        _check(0.0 <= self.start <= self.stop <= 1.0,
               f"GuidanceWindow needs 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}")
        _check_layout(o, self.uncond_first)


@dataclass(frozen=True)
class LinearAG:
    """LinearAG: in the first half of the steps, exact guidance steps alternate with steps whose unconditional
    prediction is a least-squares affine combination of past predictions (coefficients per step, fitted by
    ``ditfx calibrate-guidance``); the second half is conditional only.

    ``coefficients`` is a :class:`~ditfx.runtime.linear_ag.LinearAGCoefficients` or the path of its JSON.
    ``uncond_first``: the layout of the two guidance branches; ``None`` (the default): determined from the
    pipeline's ``cache_context`` names, the model's null class, or the data; ``True`` / ``False``: the caller
    states it (the unconditional half or call comes first, or second).
    """

    coefficients: Any = field(repr=False)
    uncond_first: bool | None = None

    def __post_init__(self):
        from ditfx.runtime.linear_ag import LinearAGCoefficients

        _check_layout("LinearAG", self.uncond_first)
        if isinstance(self.coefficients, (str, Path)):
            _set(self, "coefficients", LinearAGCoefficients.load(self.coefficients))
        if not isinstance(self.coefficients, LinearAGCoefficients):
            raise WrongType("LinearAG.coefficients must be LinearAGCoefficients or the path of a JSON written by "
                            f"'ditfx calibrate-guidance', got {type(self.coefficients).__name__}")


@dataclass(frozen=True)
class GuidanceRecording:
    """Used by :func:`ditfx.calibrate_guidance`: run full guidance and record both predictions per step.

    ``uncond_first``: the layout of the two guidance branches; ``None`` (the default): determined from the
    pipeline's ``cache_context`` names, the model's null class, or the data; ``True`` / ``False``: the caller
    states it.
    """

    uncond_first: bool | None = None

    def __post_init__(self):
        _check_layout("GuidanceRecording", self.uncond_first)


GUIDANCE_KINDS = (AdaptiveGuidance, GuidanceWindow, LinearAG, GuidanceRecording)


@dataclass(frozen=True)
class TokenBudget:
    """Token-budget patching (FlexiDiT): the early, high-noise steps run at a coarser patch size.

    ``adapter``: the weak mode's tensors, a :class:`~ditfx.budget.BudgetAdapter` or the path of one written by
    :func:`ditfx.budget.distill` (``ditfx.models.digits.budget_adapter()`` for the digits model); ``None`` runs the
    zero-shot mode (PI-resize of the native layers, no training) at ``patch_size`` (default twice the native).
    Which steps run weak, one of:

    * ``weak_until``: a fraction of normalised time: calls with ``t / time_scale > 1 - weak_until`` run weak
      (0: none, the exact native model);
    * ``flops``: the fraction of the native FLOPs to spend at most: on the step count at hand (the pipeline's
      scheduler says it) the fewest leading steps that bring the cost model's FLOPs within it run weak; without a
      known step count, the same fraction of normalised time (warned);
    * ``calibrated``: a :class:`~ditfx.budget.BudgetSchedule` (or the path of one) written by
      :func:`ditfx.budget.calibrate`, the measured weak/native gap per step: with ``flops``, the steps with the
      smallest gaps that bring the FLOPs within it run weak; alone, the weak steps the schedule has chosen.
      A call runs as the calibrated step nearest in normalised time.

    ``time_scale``: the timestep at noise level 1 (None: the adapter's, else 1000). ``merge_lora``: fold the
    adapter's low-rank updates into weak-mode copies of the block weights (a weak call then costs what the base
    linears cost; one more copy of those weights in memory); False runs the low-rank path.

    More than two levels: ``adapter`` (or, zero-shot, ``patch_size``) a list of several patch sizes and
    ``weak_until`` a list of the same length, each level's fraction of normalised time; a call runs at the
    coarsest level whose fraction covers it (``adapter=[p8, p4], weak_until=[0.2, 0.5]``: patch 8 for
    ``u > 0.8``, patch 4 for ``0.5 < u <= 0.8``, native after).
    """

    adapter: Any = field(default=None, repr=False)
    weak_until: float | None = None
    flops: float | None = None
    calibrated: Any = field(default=None, repr=False)
    patch_size: int | None = None
    time_scale: float | None = None
    resize: str = "bilinear"
    merge_lora: bool = True

    def __post_init__(self):
        from ditfx.budget.adapter import BudgetAdapter
        from ditfx.budget.schedule import BudgetSchedule

        o = "TokenBudget"
        several = [n for n in ("adapter", "patch_size", "weak_until") if isinstance(getattr(self, n), (list, tuple))]
        if several:
            return self._check_levels(several)
        if isinstance(self.adapter, (str, Path)):
            _set(self, "adapter", BudgetAdapter.load(self.adapter))
        if self.adapter is not None and not isinstance(self.adapter, BudgetAdapter):
            raise WrongType("TokenBudget.adapter must be a ditfx.budget.BudgetAdapter, the path of one, a list of "
                            f"them (several levels), or None (zero-shot), got {type(self.adapter).__name__}")
        if isinstance(self.calibrated, (str, Path)):
            _set(self, "calibrated", BudgetSchedule.load(self.calibrated))
        if self.calibrated is not None and not isinstance(self.calibrated, BudgetSchedule):
            raise WrongType("TokenBudget.calibrated must be a ditfx.budget.BudgetSchedule or the path of one written "
                            f"by ditfx.budget.calibrate, got {type(self.calibrated).__name__}")
        _check(self.weak_until is None or (self.flops is None and self.calibrated is None),
               "TokenBudget.weak_until cannot be combined with flops or calibrated: choose one schedule")
        _check(self.weak_until is not None or self.flops is not None or (
            self.calibrated is not None and bool(self.calibrated.weak)),
            "TokenBudget needs weak_until (normalised time), flops (a fraction of the native FLOPs, with or without "
            "a calibrated schedule) or a calibrated schedule whose weak steps are chosen")
        if self.weak_until is not None:
            _set(self, "weak_until", check_float(o, "weak_until", self.weak_until, 0))
            _check(self.weak_until <= 1, f"TokenBudget.weak_until is a fraction of normalised time in [0, 1], got "
                                         f"{self.weak_until}")
        if self.flops is not None:
            _set(self, "flops", check_float(o, "flops", self.flops, 0))
            _check(0 < self.flops <= 1, f"TokenBudget.flops is a fraction of the native FLOPs in (0, 1], got "
                                        f"{self.flops}")
            if self.calibrated is not None:
                _set(self, "calibrated", self.calibrated.choose(self.flops))
        _set(self, "patch_size", check_int(o, "patch_size", self.patch_size, 1, none_ok=True,
                                           hint=" (the weak patch size of the zero-shot mode)"))
        if self.adapter is not None and self.patch_size is not None and self.patch_size != self.adapter.patch:
            raise ValueError(f"TokenBudget.patch_size={self.patch_size} differs from the adapter's patch size "
                             f"{self.adapter.patch}: leave patch_size unset with an adapter")
        if self.time_scale is not None:
            _set(self, "time_scale", check_float(o, "time_scale", self.time_scale))
            _check(self.time_scale > 0, f"TokenBudget.time_scale must be > 0, got {self.time_scale}")
        check_choice(o, "resize", self.resize, ("bilinear", "bicubic"),
                     f"TokenBudget.resize must be 'bilinear' or 'bicubic', got {self.resize!r}")
        check_bool(o, "merge_lora", self.merge_lora)

    def _check_levels(self, several: list[str]) -> None:
        from ditfx.budget.adapter import BudgetAdapter

        o = "TokenBudget"
        _check(self.flops is None and self.calibrated is None,
               "TokenBudget with several levels takes weak_until per level, not flops or calibrated")
        _check(isinstance(self.weak_until, (list, tuple)),
               "TokenBudget with several adapters or patch sizes needs weak_until as a list, one fraction per level")
        n = len(self.weak_until)
        weak = tuple(check_float(o, "weak_until", w, 0) for w in self.weak_until)
        _check(all(w <= 1 for w in weak), f"TokenBudget.weak_until values are fractions in [0, 1], got {weak}")
        if self.adapter is not None:
            adapters = self.adapter if isinstance(self.adapter, (list, tuple)) else [self.adapter]
            adapters = tuple(BudgetAdapter.load(a) if isinstance(a, (str, Path)) else a for a in adapters)
            if not all(isinstance(a, BudgetAdapter) for a in adapters):
                raise WrongType("TokenBudget.adapter entries must be ditfx.budget.BudgetAdapter or paths of them")
            _check(self.patch_size is None, "leave TokenBudget.patch_size unset with adapters")
            patches = tuple(a.patch for a in adapters)
            _set(self, "adapter", adapters)
        else:
            patches = self.patch_size if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,)
            patches = tuple(check_int(o, "patch_size", p, 1) for p in patches)
            _set(self, "patch_size", patches)
        _check(len(patches) == n and n >= 1, f"TokenBudget: {len(patches)} level(s) of patch sizes and {n} weak_until "
                                             "values: give one weak_until per level")
        _check(len(set(patches)) == n, f"TokenBudget: each level needs its own patch size, got {patches}")
        _set(self, "weak_until", weak)
        if self.time_scale is not None:
            _set(self, "time_scale", check_float(o, "time_scale", self.time_scale))

    def levels(self) -> list[tuple[int | None, Any, float | None]]:
        """(patch size or None for the zero-shot default, adapter or None, weak_until) per level."""
        if isinstance(self.weak_until, tuple):
            if self.adapter is not None:
                return [(a.patch, a, w) for a, w in zip(self.adapter, self.weak_until)]
            return [(p, None, w) for p, w in zip(self.patch_size, self.weak_until)]
        return [(self.adapter.patch if self.adapter is not None else self.patch_size, self.adapter, self.weak_until)]

    @property
    def effective_time_scale(self) -> float:
        if self.time_scale is not None:
            return self.time_scale
        adapter = self.adapter[0] if isinstance(self.adapter, tuple) else self.adapter
        return adapter.time_scale if adapter is not None else 1000.0

@dataclass(frozen=True)
class HistoryAttention:
    """History attention (ARD): in the lower ``layers`` blocks, each call's self-attention also reads the keys and
    values of this generation's earlier calls, from a static buffer of ``steps`` steps per sample (a generation
    of at most ``steps`` steps; the buffer is freed when it ends). ``layers=0`` is the model without history.
    Meant for students distilled with it (``ditfx.models.digits.pipeline(student="ard")``); it cannot run with
    block caching (a skipped block computes no keys for the history)."""

    layers: int
    steps: int = 4
    heads: Any = field(default=None, repr=False)  # {"weight": (S, out, in), "bias": (S, out)}: step-specific heads

    def __post_init__(self):
        o = "HistoryAttention"
        _set(self, "layers", check_int(o, "layers", self.layers, 0, hint=" (0: no history)"))
        _set(self, "steps", check_int(o, "steps", self.steps, 1, hint=" (the steps of history the buffer holds)"))
        if self.heads is not None:
            w, b = (self.heads.get(k) if isinstance(self.heads, dict) else None for k in ("weight", "bias"))
            if not (hasattr(w, "dim") and hasattr(b, "dim") and w.dim() == 3 and b.dim() == 2
                    and w.shape[0] == b.shape[0] == self.steps and w.shape[1] == b.shape[1]):
                raise ValueError("HistoryAttention.heads must be {'weight': (steps, out, in), 'bias': (steps, out)} "
                                 f"tensors, one output head per step ({self.steps})")


# the "kind" of a dict-form cache or guidance in torch.compile options
CACHE_OPTION_KINDS = {"dynamic": DynamicCache, "static": StaticCache}
GUIDANCE_OPTION_KINDS = {"adaptive": AdaptiveGuidance, "window": GuidanceWindow, "linear": LinearAG}
_OPTION_EXAMPLES = {
    "dynamic": "{'kind': 'dynamic', 'threshold': 0.1}",
    "static": "{'kind': 'static', 'delta': 0.1, 'schedule': 'schedule.json'}",
    "adaptive": "{'kind': 'adaptive', 'gamma': 0.99}",
    "window": "{'kind': 'window', 'start': 0.0, 'stop': 0.5}",
    "linear": "{'kind': 'linear', 'coefficients': 'linear_ag.json'}",
}


def _from_option_dict(name: str, spec: dict, kinds: dict[str, type], default: str):
    """A cache or guidance config from its dict form in torch.compile options: ``{"kind": ..., **fields}``."""
    spec = dict(spec)
    kind = spec.pop("kind", default)
    names = " or ".join(repr(k) for k in kinds) if len(kinds) == 2 else "one of " + ", ".join(map(repr, kinds))
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"options[{name!r}]: {name} kind must be {names}, got {kind!r} "
                         f"(e.g. {_OPTION_EXAMPLES[default]})")
    cls = kinds[kind]
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(map(str, set(spec) - set(known)))
    if unknown:
        raise ValueError(f"options[{name!r}] of kind {kind!r} ({cls.__name__}) has unknown key(s) {unknown}; "
                         f"known: {['kind', *known]}")
    missing = [f.name for f in fields if f.name not in spec
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"options[{name!r}] of kind {kind!r} ({cls.__name__}) needs {missing}, "
                         f"e.g. {_OPTION_EXAMPLES[kind]}")
    return cls(**spec)


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
    budget: TokenBudget | None = None
    history: HistoryAttention | None = None
    # how ditfx.tune chose this config (budget, measured front, held-out check); JSON-able, not part of equality
    tuning: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (self.tuning is None or isinstance(self.tuning, dict)):
            raise WrongType(f"Config.tuning is the record ditfx.tune writes (a dict) or None, got "
                            f"{type(self.tuning).__name__}")
        check_bool("Config", "kernels", self.kernels,
                   hint=" (lower adaLN / gated-residual patterns to ditfx kernels)")
        check_choice("Config", "compiler", self.compiler, INNER_BACKENDS,
                     f"unknown inner backend {self.compiler!r}: use one of {', '.join(INNER_BACKENDS)}")
        check_choice("Config", "compile_regions", self.compile_regions, COMPILED_REGIONS,
                     f"Config.compile_regions must be one of {COMPILED_REGIONS}, got {self.compile_regions!r}")
        if not (self.cache is None or isinstance(self.cache, CACHE_KINDS)):
            raise WrongType(f"Config.cache must be ditfx.DynamicCache, ditfx.StaticCache or None, got "
                            f"{self.cache!r} ({type(self.cache).__name__}): build one, e.g. "
                            f"ditfx.DynamicCache(threshold=0.1) (torch.compile options take a dict, "
                            f"{_OPTION_EXAMPLES['dynamic']})")
        if not (self.budget is None or isinstance(self.budget, TokenBudget)):
            raise WrongType(f"Config.budget must be ditfx.TokenBudget or None, got {type(self.budget).__name__}: "
                            "build one, e.g. ditfx.TokenBudget(adapter=..., flops=0.6)")
        if not (self.history is None or isinstance(self.history, HistoryAttention)):
            raise WrongType(f"Config.history must be ditfx.HistoryAttention or None, got {type(self.history).__name__}")
        if self.history is not None and self.cache is not None:
            raise ValueError("Config.history and Config.cache cannot be combined: a block the cache skips computes "
                             "no keys and values for the history; drop one of them")
        if not (self.guidance is None or isinstance(self.guidance, GUIDANCE_KINDS)):
            raise WrongType("Config.guidance must be ditfx.AdaptiveGuidance, ditfx.LinearAG, ditfx.GuidanceWindow or "
                            f"None, got {self.guidance!r} ({type(self.guidance).__name__}): build one, e.g. "
                            f"ditfx.AdaptiveGuidance() (torch.compile options take a dict, "
                            f"{_OPTION_EXAMPLES['adaptive']})")

    def save(self, path) -> Path:
        """Write this config as versioned JSON (``.json``; schedule and adapter files beside it)."""
        from ditfx.config_io import save_config

        return save_config(self, path)

    @classmethod
    def load(cls, path) -> Config:
        """Read a config written by :meth:`save` or ``ditfx.tune`` (``ditfx tune MODEL --out PATH``)."""
        from ditfx.config_io import load_config

        return load_config(path)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Config:
        """Build from ``torch.compile(..., backend="ditfx", options={...})``.

        Accepts ``{"config": Config}`` or plain fields: ``{"compiler": "aot_eager",
        "cache": {"kind": "dynamic", "threshold": 0.1}}``. A dict-form ``cache`` has ``kind`` ``"dynamic"``
        (the default) or ``"static"``; a dict-form ``guidance`` ``"adaptive"`` (the default), ``"window"`` or
        ``"linear"``; the other keys are the fields of that class.
        """
        if options is not None and not isinstance(options, dict):
            raise WrongType(f"ditfx options must be a dict, got {type(options).__name__}: pass e.g. "
                            "options={'compiler': 'inductor', 'cache': {'kind': 'dynamic', 'threshold': 0.1}}")
        options = dict(options or {})
        if "config" in options:
            config = options.pop("config")
            _check(not options, f"pass either 'config' or fields, not both: {sorted(options)}")
            _check(isinstance(config, Config), f"options['config'] must be a ditfx.Config, got {config!r}")
            return config
        known = {f.name for f in dataclasses.fields(cls)} - {"tuning"}
        unknown = set(options) - known
        _check(not unknown, f"unknown ditfx option(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
        if isinstance(options.get("cache"), dict):
            options["cache"] = _from_option_dict("cache", options["cache"], CACHE_OPTION_KINDS, "dynamic")
        if isinstance(options.get("budget"), dict):
            options["budget"] = TokenBudget(**options["budget"])
        if isinstance(options.get("guidance"), dict):
            options["guidance"] = _from_option_dict("guidance", options["guidance"], GUIDANCE_OPTION_KINDS,
                                                    "adaptive")
        return cls(**options)
