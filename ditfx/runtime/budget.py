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
from ditfx.runtime.policy import Policy, register_policy


@register_policy(TokenBudget)
class TokenBudgetPolicy(Policy):
    name = "budget"

    def __init__(self, cfg: TokenBudget, plan: Plan):
        super().__init__(cfg, plan)
        self.cfg = cfg
        # (mode, weak_until), coarsest first: the pass built one mode per level, in the config's order
        self.levels = sorted(zip(plan.modes, [w for *_, w in cfg.levels()]), key=lambda m: -int(m[0][1:]))
        self.weak = self.levels[-1][0] if self.levels else None  # the finest weak mode (flops, calibrated)
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

    def mode_at(self, u: float, step: int, steps: int | None) -> str | None:
        """The mode of a call at normalised time ``u``, step ``step`` of ``steps`` (None: native)."""
        cfg = self.cfg
        if cfg.calibrated is not None:
            return self.weak if cfg.calibrated.is_weak(u) else None
        if cfg.flops is not None and steps:
            return self.weak if step < weak_steps_for(steps, self.ratio, cfg.flops) else None
        if cfg.flops is not None:
            return self.weak if u > 1 - self.weak_fraction() + 1e-9 else None
        return next((mode for mode, until in self.levels if u > 1 - until + 1e-9), None)

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
        return self.mode_at(info.timestep / self.time_scale, info.step, info.steps)

    def describe(self, steps: int) -> dict:
        """The per-step patch size on ``steps`` uniform steps, for ``ditfx inspect``."""
        total = max(1, sum(self.plan.flops.values()))
        ratios = {m: sum(sub.flops.values()) / total for m, sub in self.plan.modes.items()}
        modes = [self.mode_at(1 - k / steps, k, steps) for k in range(steps)]
        return {"kind": "budget", "mode": self.weak, "modes": [m for m, _ in self.levels], "flops_ratio": ratios,
                "patch": [int(m[1:]) if m else "native" for m in modes],
                "weak_steps": sum(m is not None for m in modes), "steps": steps,
                "flops_fraction": sum(ratios[m] if m else 1.0 for m in modes) / steps,
                "tokens": {"native": self.plan.tokens, **{m: sub.tokens for m, sub in self.plan.modes.items()}}}

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=5)
