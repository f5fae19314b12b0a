"""Guidance skipping at run time: which rows of a classifier-free-guidance call to compute, and how to fill the
rest so that an unchanged pipeline's ``u + s * (c - u)`` gives the intended prediction.

CFG layouts, detected on the first step of each generation:

* ``batched``: one call of 2B rows whose halves have equal latents and timesteps (unconditional half first
  unless ``uncond_first=False``);
* ``two_call``: two calls per step with equal latents (the unconditional call first unless
  ``uncond_first=False``).

A sample whose guidance is off gets its conditional prediction in its unconditional slot (exactly ``c`` after
the pipeline's combine). LinearAG puts its estimate there instead. In the two-call layout with the
unconditional call first, that slot is returned before the conditional call runs, so it is filled in place when
the conditional call returns (pipelines combine after both calls).

Rows are computed in a few bucket sizes (a quarter of the branch at a time, padded with rows that are computed
and discarded), so per-sample switching compiles at most five batch sizes per region.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ditfx.config import AdaptiveGuidance, GuidanceRecording, GuidanceWindow, LinearAG
from ditfx.passes.guidance import cosine_from_sums
from ditfx.runtime import linear_ag
from ditfx.runtime.steps import StepInfo

BUCKETS = 4  # unconditional rows are computed in multiples of ceil(B / BUCKETS)


@dataclass
class CallPlan:
    """What one call computes: ``rows`` of the call (None: all), and how its output is completed."""

    rows: torch.Tensor | None
    kind: str  # "full", "partial", "none"
    copy_from_cond: torch.Tensor | None = None  # samples whose uncond slot gets their cond prediction
    estimate: bool = False  # LinearAG fills the uncond slots of every sample


@dataclass
class GuidanceState:
    layout: str | None = None  # "batched", "two_call", "none"
    half: int = 0  # B: samples per branch
    active: torch.Tensor | None = None  # (B,) samples still on full guidance
    delta: torch.Tensor | None = None  # (B, ...) c - u at each sample's last full step (fill="delta")
    delta_time: torch.Tensor | None = None  # (B,) t / t_first at that step
    cosines: list[list[float]] = field(default_factory=list)  # per full-guidance step, per sample
    first_latents: torch.Tensor | None = None
    first_timestep: float | None = None
    first_out: list | None = None  # outputs of the first call, until the layout is known
    uncond_out: list | None = None  # two-call: this step's unconditional outputs (to fill or compare)
    pending: CallPlan | None = None  # two-call: the plan of this step's unconditional call
    cond_out: list | None = None  # two-call, cond first: this step's conditional outputs
    cond_history: list[torch.Tensor] = field(default_factory=list)  # LinearAG / recording: per step
    uncond_history: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # normalised time of each step
    progress: float = 0.0  # 1 - t / t_first of the current step


def _bucket(k: int, half: int) -> int:
    if k == 0:
        return 0
    unit = -(-half // BUCKETS)
    return min(half, -(-k // unit) * unit)


class GuidancePolicy:
    """One policy object per optimized model; state per generation (see :class:`GuidanceState`)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.uncond_first = cfg.uncond_first
        self.recorded: list[GuidanceState] = []  # GuidanceRecording: finished trajectories
        self.last_state: GuidanceState | None = None  # the latest generation's, for ditfx.guidance_trace
        self._warned = False

    @property
    def measures_cosine(self) -> bool:
        return isinstance(self.cfg, AdaptiveGuidance)

    def measured_pairs(self, state: GuidanceState, plan: CallPlan):
        """Where this call's output holds the predictions AG compares: ``(uncond rows, cond rows, samples)``
        positions in the computed rows, for the compiled epilogue to reduce; None when nothing is measured or
        the layout is not one batched call (two calls: the runtime compares them after the second)."""
        if state.layout != "batched" or not bool(state.active.any()):
            return None
        h = state.half
        u0, c0 = (0, h) if self.uncond_first else (h, 0)
        if plan.rows is None:
            samples = torch.arange(h)
            return samples + u0, samples + c0, samples
        computed = plan.rows[(plan.rows >= u0) & (plan.rows < u0 + h)] - u0  # samples with their uncond row
        if not len(computed):
            return None
        return (torch.searchsorted(plan.rows, computed + u0), torch.searchsorted(plan.rows, computed + c0),
                computed)

    @staticmethod
    def cosine_of(state: GuidanceState, samples: torch.Tensor, sums: tuple) -> torch.Tensor:
        """(B,) cosines from the epilogue's sums; NaN for samples whose unconditional row was not computed."""
        cos = torch.full((state.half,), float("nan"), dtype=torch.float64)
        cos[samples] = cosine_from_sums(*(s.detach().cpu() for s in sums))
        return cos

    def new_state(self) -> GuidanceState:
        state = self.last_state = GuidanceState()
        if isinstance(self.cfg, GuidanceRecording):
            self.recorded.append(state)
        return state

    # ---------------------------------------------------------------------------------------------- layout
    def _detect(self, state: GuidanceState, step: StepInfo, latents: torch.Tensor) -> None:
        """Called on every step-0 call until the layout is known."""
        rows = latents.shape[0]
        if step.branch == 0:
            h = rows // 2
            if rows % 2 == 0 and torch.equal(latents[:h], latents[h:]):
                state.layout, state.half = "batched", h
            else:
                state.first_latents = latents
            return
        if state.first_latents is not None and torch.equal(state.first_latents, latents) and step.branch == 1:
            state.layout, state.half = "two_call", rows
            return
        state.layout = "none"

    def _no_cfg(self, state: GuidanceState) -> None:
        state.layout = "none"
        if not self._warned:
            self._warned = True
            warnings.warn("ditfx guidance: no classifier-free guidance found in the denoiser's calls (neither a "
                          "batch whose halves share latents nor two calls per step with equal latents); "
                          "guidance skipping is off for this model", stacklevel=3)

    # ----------------------------------------------------------------------------------------- decisions
    def _guided(self, state: GuidanceState, step: StepInfo) -> str:
        """This step's kind: "exact" (full guidance), "estimate" (LinearAG), "cond" (guidance off for all)."""
        cfg = self.cfg
        if step.timestep is None and isinstance(cfg, (GuidanceWindow, LinearAG)):
            raise RuntimeError(f"{type(cfg).__name__} follows the generation's timesteps, and this graph has no "
                               "timestep input that ditfx recognises; use AdaptiveGuidance")
        if isinstance(cfg, GuidanceWindow):
            return "exact" if cfg.start <= state.progress < cfg.stop else "cond"
        if isinstance(cfg, LinearAG):
            coeffs = cfg.coefficients
            if step.step >= coeffs.steps:
                raise RuntimeError(f"LinearAG coefficients were fitted for {coeffs.steps} steps; this generation "
                                   f"has more. Fit them for this step count with ditfx.calibrate_guidance")
            u = step.timestep / state.first_timestep if state.first_timestep else 1.0
            if abs(u - coeffs.times[step.step]) > 1e-3:
                raise RuntimeError(f"LinearAG coefficients were fitted on another step grid (step {step.step} at "
                                   f"normalised time {coeffs.times[step.step]:.4f}, this generation "
                                   f"{u:.4f}); fit them for this scheduler and step count")
            return linear_ag.step_kind(step.step, coeffs.steps)
        if isinstance(cfg, GuidanceRecording):
            return "exact"
        return "exact" if bool(state.active.any()) else "cond"

    def begin_call(self, state: GuidanceState, step: StepInfo, latents: torch.Tensor) -> CallPlan:
        if state.layout is None:
            if step.step == 0:
                if step.branch == 0:
                    state.first_timestep = step.timestep
                self._detect(state, step, latents)
            else:  # a whole step went by with one call and no equal halves
                state.layout = "none"
            if state.layout == "none":
                self._no_cfg(state)
            elif state.layout is not None:
                self._start(state)
        if step.branch == 0 and step.timestep is not None and state.first_timestep:
            state.times.append(step.timestep / state.first_timestep)
            state.progress = 1.0 - state.times[-1]
        if state.layout in (None, "none"):
            return CallPlan(None, "full")
        kind = self._guided(state, step)
        if state.layout == "batched":
            return self._plan_batched(state, kind)
        return self._plan_two_call(state, step, kind)

    def _start(self, state: GuidanceState) -> None:
        state.active = torch.ones(state.half, dtype=torch.bool)
        if state.layout == "two_call":  # the step's first call ran before the layout was known
            if self.uncond_first:
                state.uncond_out, state.pending = state.first_out, CallPlan(None, "full")
            else:
                state.cond_out = state.first_out
        state.first_out = state.first_latents = None

    def _uncond_rows(self, state: GuidanceState, needed: torch.Tensor) -> torch.Tensor:
        """Sample indices whose unconditional row is computed: ``needed`` padded to a bucket size."""
        k = int(needed.sum())
        target = _bucket(k, state.half)
        chosen = needed.clone()
        for i in (~needed).nonzero().flatten().tolist()[: target - k]:
            chosen[i] = True
        return chosen.nonzero().flatten()

    def _plan_batched(self, state: GuidanceState, kind: str) -> CallPlan:
        h = state.half
        if kind == "exact" and (not isinstance(self.cfg, AdaptiveGuidance) or bool(state.active.all())):
            return CallPlan(None, "full")
        u0, c0 = (0, h) if self.uncond_first else (h, 0)
        needed = state.active if kind == "exact" else torch.zeros(h, dtype=torch.bool)
        samples = self._uncond_rows(state, needed)
        rows = torch.cat([samples + u0, torch.arange(h) + c0]).sort().values
        return CallPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten(), estimate=kind == "estimate")

    def _plan_two_call(self, state: GuidanceState, step: StepInfo, kind: str) -> CallPlan:
        is_uncond = (step.branch == 0) == self.uncond_first
        if not is_uncond or step.step == 0:
            return CallPlan(None, "full")
        if kind == "exact" and (bool(state.active.all()) or not isinstance(self.cfg, AdaptiveGuidance)):
            return CallPlan(None, "full")
        needed = state.active if kind == "exact" else torch.zeros(state.half, dtype=torch.bool)
        if not bool(needed.any()):
            return CallPlan(torch.zeros(0, dtype=torch.long), "none", copy_from_cond=torch.arange(state.half),
                            estimate=kind == "estimate")
        rows = self._uncond_rows(state, needed)
        return CallPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten())

    # -------------------------------------------------------------------------------------- completion
    def complete(self, state: GuidanceState, step: StepInfo, plan: CallPlan, outs: list, like: list,
                 cosine: torch.Tensor | None = None) -> list:
        """Full-size outputs of the call from the computed rows ``outs`` (``like``: example full outputs);
        ``cosine``: AG's per-sample measurement when the compiled epilogue made it."""
        if state.layout == "batched":
            return self._complete_batched(state, plan, outs, cosine)
        if state.layout == "two_call":
            return self._complete_two_call(state, step, plan, outs, like)
        if state.layout is None and step.step == 0 and step.branch == 0:
            state.first_out = list(outs)  # kept until the next call tells whether this step has two calls
        return outs

    def _scatter(self, plan: CallPlan, outs: list, rows: int) -> list:
        if plan.rows is None:
            return list(outs)
        full = []
        for o in outs:
            if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == len(plan.rows):
                base = o.new_empty((rows, *o.shape[1:]))
                full.append(base.index_copy(0, plan.rows, o))
            else:
                full.append(o)
        return full

    def _halves(self, o: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (o[:h], o[h:]) if self.uncond_first else (o[h:], o[:h])

    def _complete_batched(self, state: GuidanceState, plan: CallPlan, outs: list, cosine=None) -> list:
        h = state.half
        full = self._scatter(plan, outs, 2 * h)
        pred = full[0]
        uncond, cond = self._halves(pred, h)
        if plan.estimate:
            estimate = self._estimate(state, cond)
            for o in full:
                if self._is_batch(o, 2 * h):
                    self._halves(o, h)[0].copy_(estimate if o is pred else self._halves(o, h)[1])
        elif plan.copy_from_cond is not None and len(plan.copy_from_cond):
            for o in full:
                if self._is_batch(o, 2 * h):
                    u, c = self._halves(o, h)
                    u[plan.copy_from_cond] = self._switched_uncond(state, plan.copy_from_cond, c, o is pred)
        self._after_step(state, uncond, cond, plan, cosine)
        return full

    def _complete_two_call(self, state: GuidanceState, step: StepInfo, plan: CallPlan, outs: list,
                           like: list) -> list:
        h = state.half
        if (step.branch == 0) == self.uncond_first:  # the unconditional call
            if plan.kind == "none":  # nothing computed: a fresh buffer for the slot
                full = [torch.empty_like(o) if self._is_batch(o, h) else o for o in like]
            else:
                full = self._scatter(plan, outs, h)
            if self.uncond_first:  # the conditional call comes next: it fills the slot and measures
                state.uncond_out, state.pending = full, plan
            else:
                self._fill_uncond(state, plan, full, state.cond_out)
                self._after_step(state, full[0], state.cond_out[0], plan)
            return full
        if self.uncond_first:
            self._fill_uncond(state, state.pending, state.uncond_out, outs)
            self._after_step(state, state.uncond_out[0], outs[0], state.pending)
            state.uncond_out = state.pending = None
        else:
            state.cond_out = list(outs)
        return list(outs)

    def _fill_uncond(self, state: GuidanceState, plan: CallPlan, uncond_full: list, cond_full: list) -> None:
        if plan.estimate:
            uncond_full[0].copy_(self._estimate(state, cond_full[0]))
            return
        idx = plan.copy_from_cond
        if idx is not None and len(idx):
            for k, (u, c) in enumerate(zip(uncond_full, cond_full)):
                if self._is_batch(u, state.half):
                    u[idx] = self._switched_uncond(state, idx, c, k == 0)

    def _switched_uncond(self, state: GuidanceState, idx: torch.Tensor, cond: torch.Tensor, is_pred: bool):
        """The unconditional slot of switched samples ``idx``: their conditional output, less (for the prediction,
        with ``fill="delta"``) the guidance direction of their last full step scaled by t / t_switch."""
        if not is_pred or state.delta is None:
            return cond[idx]
        scale = (1.0 - state.progress) / state.delta_time[idx].clamp_min(1e-12)  # t / t_switch
        scale = scale.to(cond.device, cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
        return cond[idx] - state.delta[idx] * scale

    @staticmethod
    def _is_batch(o, rows: int) -> bool:
        return isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == rows

    def _estimate(self, state: GuidanceState, cond: torch.Tensor) -> torch.Tensor:
        k = len(state.cond_history)
        betas = self.cfg.coefficients.betas[k]
        cols = linear_ag.features(state.cond_history + [cond], state.uncond_history, k, self.cfg.coefficients.window)
        return linear_ag.combine(betas, cols)

    def _after_step(self, state: GuidanceState, uncond: torch.Tensor, cond: torch.Tensor, plan: CallPlan,
                    cosine: torch.Tensor | None = None) -> None:
        """Record the step's predictions where a later step needs them, and update the AG switch."""
        if isinstance(self.cfg, (LinearAG, GuidanceRecording)):
            state.cond_history.append(cond.detach().clone())
            state.uncond_history.append(uncond.detach().clone())
            return
        if not isinstance(self.cfg, AdaptiveGuidance) or not bool(state.active.any()):
            return
        cos = cosine if cosine is not None else torch.cosine_similarity(
            cond.flatten(1).double(), uncond.flatten(1).double(), dim=1).cpu()
        measured = state.active.clone()
        if plan.copy_from_cond is not None:
            measured[plan.copy_from_cond] = False
        state.cosines.append([float(c) if m else float("nan") for c, m in zip(cos, measured)])
        if state.progress < self.cfg.warmup:
            return
        reached = (cos >= self.cfg.gamma) & measured
        before = state.active.clone()
        if self.cfg.per_sample:
            state.active &= ~reached
        elif bool(reached[state.active].all()):
            state.active[:] = False
        switched = before & ~state.active
        if self.cfg.fill == "delta" and bool(switched.any()):
            if state.delta is None:
                state.delta = torch.zeros_like(cond)
                state.delta_time = torch.ones(state.half, dtype=torch.float64)
            state.delta[switched] = (cond - uncond)[switched]
            state.delta_time[switched] = 1.0 - state.progress
