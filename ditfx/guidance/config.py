"""Guidance skipping's knobs: the config dataclasses, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ditfx.guidance.linear_ag import LinearAGCoefficients
from ditfx.validation import WrongType, check_bool, check_choice, check_float, require, set_field


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
        set_field(self, "gamma", check_float(o, "gamma", self.gamma))
        require(-1.0 <= self.gamma <= 1.0, f"AdaptiveGuidance.gamma is a cosine in [-1, 1], got {self.gamma}")
        check_bool(o, "per_sample", self.per_sample)
        _check_layout(o, self.uncond_first)
        set_field(self, "warmup", check_float(o, "warmup", self.warmup))
        require(0.0 <= self.warmup < 1.0, f"AdaptiveGuidance.warmup is a fraction of the generation in [0, 1), "
                                         f"got {self.warmup}")
        check_choice(o, "fill", self.fill, ("cond", "delta"),
                     f"AdaptiveGuidance.fill must be 'cond' (guidance ends) or 'delta' (the last measured guidance "
                     f"direction, fading to zero at t = 0), got {self.fill!r}")
        set_field(self, "fade", check_float(o, "fade", self.fade, 0,
                                            hint=" (0 keeps the direction, 1 fades it linearly)"))


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
        set_field(self, "start", check_float(o, "start", self.start))
        set_field(self, "stop", check_float(o, "stop", self.stop))
        require(0.0 <= self.start <= self.stop <= 1.0,
               f"GuidanceWindow needs 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}")
        _check_layout(o, self.uncond_first)


@dataclass(frozen=True)
class LinearAG:
    """LinearAG: in the first half of the steps, exact guidance steps alternate with steps whose unconditional
    prediction is a least-squares affine combination of past predictions (coefficients per step, fitted by
    ``ditfx.calibrate_guidance``); the second half is conditional only.

    ``coefficients`` is a :class:`~ditfx.guidance.linear_ag.LinearAGCoefficients` or the path of its JSON.
    ``uncond_first``: the layout of the two guidance branches; ``None`` (the default): determined from the
    pipeline's ``cache_context`` names, the model's null class, or the data; ``True`` / ``False``: the caller
    states it (the unconditional half or call comes first, or second).
    """

    coefficients: LinearAGCoefficients | str | Path = field(repr=False)
    uncond_first: bool | None = None

    def __post_init__(self):
        _check_layout("LinearAG", self.uncond_first)
        if isinstance(self.coefficients, (str, Path)):
            set_field(self, "coefficients", LinearAGCoefficients.load(self.coefficients))
        if not isinstance(self.coefficients, LinearAGCoefficients):
            raise WrongType("LinearAG.coefficients must be LinearAGCoefficients or the path of a JSON written by "
                            f"ditfx.calibrate_guidance(), got {type(self.coefficients).__name__}")


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
