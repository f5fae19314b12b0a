"""Token budgets' policy: which mode (patch size) each denoiser call runs in.

A mode selector: it chooses before any region runs (``choose_mode``); the executor then runs that mode's plan with
that mode's policies, and hands this policy the call's end, where it counts the tokens the call ran. State across
a switch: block caches are per mode (their values have the mode's token count, so a mode starts its cache afresh
at its first call), guidance state is per generation and carries across (it concerns the trajectory, whose
latents have the same shape in both modes).
"""
from __future__ import annotations

from ditfx.budget.config import TokenBudget
from ditfx.budget.schedule import weak_steps_for
from ditfx.plan import ModeKey, Plan
from ditfx.runtime.policy import CallContext, ModeSelector, register_policy
from ditfx.runtime.warn import WarnOnce


@register_policy(TokenBudget)
class TokenBudgetPolicy(ModeSelector):
    name = "budget"
    requires = {"timestep": "to place each call in the generation (normalised time)"}

    def __init__(self, config: TokenBudget, plan: Plan):
        super().__init__(config, plan)
        # (mode, weak_until), coarsest first: the pass built one mode per level, in the config's order
        self.levels = sorted(zip(plan.modes, [w for *_, w in config.levels()]), key=lambda m: -m[0].level)
        self.weak = self.levels[-1][0] if self.levels else None  # the finest weak mode (flops, calibrated)
        sub = plan.modes.get(self.weak)
        self.ratio = sum(sub.flops.values()) / max(1, sum(plan.flops.values())) if sub is not None else 1.0
        self.time_scale = config.effective_time_scale
        self.tokens = {None: plan.tokens, **{key: mode.tokens for key, mode in plan.modes.items()}}
        self._warn = WarnOnce()
        if config.flops is not None and sub is not None and config.flops < self.ratio:
            self._warn("floor", f"ditfx: TokenBudget(flops={config.flops}) is below what the weak mode costs "
                       f"({self.ratio:.3f} of the native FLOPs per call): every step runs weak", stacklevel=3)

    def weak_fraction(self) -> float:
        """The fraction of normalised time that runs weak when no step count is known."""
        if self.config.weak_until is not None:
            return self.config.weak_until
        return min(1.0, max(0.0, (1 - self.config.flops) / (1 - self.ratio))) if self.ratio < 1 else 0.0

    def mode_at(self, u: float, step: int, steps: int | None) -> ModeKey | None:
        """The mode of a call at normalised time ``u``, step ``step`` of ``steps`` (None: native)."""
        cfg = self.config
        if cfg.calibrated is not None:
            return self.weak if cfg.calibrated.is_weak(u) else None
        if cfg.flops is not None and steps:
            return self.weak if step < weak_steps_for(steps, self.ratio, cfg.flops) else None
        if cfg.flops is not None:
            return self.weak if u > 1 - self.weak_fraction() + 1e-9 else None
        return next((mode for mode, until in self.levels if u > 1 - until + 1e-9), None)

    def choose_mode(self, ctx: CallContext) -> ModeKey | None:
        if self.weak is None:
            return None
        if ctx.group is not None:  # a coarser token grid would merge patches inside each rank's shard
            raise RuntimeError("TokenBudget does not run under context parallelism yet (each rank holds a shard "
                               "of the tokens the weak mode would re-tokenise): optimize without budget=..., or "
                               "without enable_parallelism")
        info = ctx.info
        if self.config.flops is not None and self.config.calibrated is None and not info.steps:
            self._warn("steps", "ditfx: TokenBudget(flops=...) does not know this generation's step count (no "
                       "pipeline scheduler states it): the weak mode covers the same fraction of normalised time "
                       f"({self.weak_fraction():.3f}), which meets the FLOPs on a uniform time grid", stacklevel=5)
        return self.mode_at(info.timestep / self.time_scale, info.step, info.steps)

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        ctx.count(tokens=self.tokens[ctx.mode] * ctx.computed_rows)
        return outputs

    def describe(self, steps: int) -> dict:
        """The per-step patch size on ``steps`` uniform steps, for ``ditfx inspect``."""
        total = max(1, sum(self.plan.flops.values()))
        ratios = {m.name: sum(sub.flops.values()) / total for m, sub in self.plan.modes.items()}
        modes = [self.mode_at(1 - k / steps, k, steps) for k in range(steps)]
        return {"kind": "budget", "mode": self.weak.name if self.weak else None,
                "modes": [m.name for m, _ in self.levels], "flops_ratio": ratios,
                "patch": [m.level if m else "native" for m in modes],
                "weak_steps": sum(m is not None for m in modes), "steps": steps,
                "flops_fraction": sum(ratios[m.name] if m else 1.0 for m in modes) / steps,
                "tokens": {"native": self.plan.tokens, **{m.name: sub.tokens for m, sub in self.plan.modes.items()}}}
