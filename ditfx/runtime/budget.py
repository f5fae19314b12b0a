"""The token-budget policy: which mode (patch size) each denoiser call runs in.

It chooses before any region runs (``choose_mode``); the executor then runs that mode's plan with that mode's
policies. State across a switch: block caches are per mode (their values have the mode's token count, so a mode
starts its cache afresh at its first call), guidance state is per generation and carries across (it concerns the
trajectory, whose latents have the same shape in both modes).
"""
from __future__ import annotations

import warnings

from ditfx.budget.schedule import weak_steps_for
from ditfx.config import TokenBudget
from ditfx.plan import Plan
from ditfx.runtime.lifecycle import CallInfo
from ditfx.runtime.policy import CallContext, Policy, register_policy


@register_policy(TokenBudget)
class TokenBudgetPolicy(Policy):
    name = "budget"

    def __init__(self, cfg: TokenBudget, plan: Plan):
        super().__init__(cfg, plan)
        self.cfg = cfg
        self.weak = next(iter(plan.modes), None)
        sub = plan.modes.get(self.weak)
        self.ratio = sum(sub.flops.values()) / max(1, sum(plan.flops.values())) if sub is not None else 1.0
        self.time_scale = cfg.effective_time_scale
        self._warned: set[str] = set()
        if cfg.flops is not None and sub is not None and cfg.flops < self.ratio:
            warnings.warn(f"ditfx: TokenBudget(flops={cfg.flops}) is below what the weak mode costs ({self.ratio:.3f} "
                          "of the native FLOPs per call): every step runs weak", stacklevel=2)

    def weak_fraction(self) -> float:
        """The fraction of normalised time that runs weak when no step count is known."""
        if self.cfg.weak_until is not None:
            return self.cfg.weak_until
        return min(1.0, max(0.0, (1 - self.cfg.flops) / (1 - self.ratio))) if self.ratio < 1 else 0.0

    def is_weak(self, u: float, step: int, steps: int | None) -> bool:
        cfg = self.cfg
        if cfg.calibrated is not None:
            return cfg.calibrated.is_weak(u)
        if cfg.flops is not None and steps:
            return step < weak_steps_for(steps, self.ratio, cfg.flops)
        return u > 1 - self.weak_fraction() + 1e-9

    def choose_mode(self, info: CallInfo) -> str | None:
        if self.weak is None:
            return None
        if info.timestep is None:
            self._warn("timestep", "ditfx: TokenBudget needs the denoiser's timestep to place a call in the "
                       "generation, and this graph has none ditfx reads; every call runs at the native patch size")
            return None
        if self.cfg.flops is not None and self.cfg.calibrated is None and not info.steps:
            self._warn("steps", "ditfx: TokenBudget(flops=...) does not know this generation's step count (no "
                       "pipeline scheduler states it): the weak mode covers the same fraction of normalised time "
                       f"({self.weak_fraction():.3f}), which meets the FLOPs on a uniform time grid")
        u = info.timestep / self.time_scale
        return self.weak if self.is_weak(u, info.step, info.steps) else None

    def begin_call(self, ctx: CallContext) -> None:
        pass

    def describe(self, steps: int) -> dict:
        """The per-step patch size on ``steps`` uniform steps, for ``ditfx inspect``."""
        sub = self.plan.modes.get(self.weak)
        weak_patch = int(self.weak[1:]) if self.weak else None
        native = [self.is_weak(1 - k / steps, k, steps) for k in range(steps)]
        return {"kind": "budget", "mode": self.weak, "flops_ratio": self.ratio,
                "patch": [weak_patch if w else "native" for w in native],
                "weak_steps": sum(native), "steps": steps,
                "flops_fraction": (sum(native) * self.ratio + steps - sum(native)) / steps,
                "tokens": {"native": self.plan.tokens, self.weak: sub.tokens if sub is not None else None}}

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=5)
