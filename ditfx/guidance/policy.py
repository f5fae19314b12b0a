"""Guidance skipping's policies: which rows of a classifier-free-guidance call to compute, and how to fill the
rest so that an unchanged pipeline's ``u + s * (c - u)`` gives the intended prediction.

The layout of the two branches is determined by :mod:`ditfx.guidance.layout` (evidence, not assumption); this
module decides, per step, which samples stay on full guidance and fills the others.

A sample whose guidance is off gets its conditional prediction in its unconditional slot (exactly ``c`` after
the pipeline's combine), less the fading last guidance direction with ``fill="delta"``; LinearAG puts its
estimate there. In the two-call layout with the unconditional call first, that slot is returned before the
conditional call runs, so it is filled in place when the conditional call returns (pipelines combine after both
calls). Rows are computed in buckets (:func:`ditfx.runtime.rows.bucket`: padded with rows that are computed and
discarded), so per-sample switching compiles few batch sizes per region.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import ditfx.guidance.linear_ag as linear_ag
import ditfx.guidance.variants as variants
from ditfx.guidance.config import AdaptiveGuidance, GuidanceRecording, GuidanceWindow, LinearAG
from ditfx.guidance.layout import Layout, LayoutEvidence
from ditfx.runtime.policy import CallContext, Policy, RegionCall, StateSlot, register_policy
from ditfx.runtime.rows import bucket, is_per_row
from ditfx.runtime.warn import WarnOnce

COSINE = (variants.COSINE,)
TRACE = "guidance_cosines"  # record: per generation, AG's per-step, per-sample cosines
RECORDING = "guidance_recording"  # record: per generation, the full-guidance predictions
LATENTS = "to find the guidance layout (the rows or calls that share latents)"
TIMESTEP = "to follow the generation's progress (AdaptiveGuidance needs no timestep)"


@dataclass
class RowPlan:
    """What one call computes: ``rows`` of the call (None: all), and how its output is completed."""

    rows: torch.Tensor | None
    kind: str  # "full", "partial", "none"
    copy_from_cond: torch.Tensor | None = None  # samples whose uncond slot gets their cond prediction
    estimate: bool = False  # LinearAG fills the uncond slots of every sample


@dataclass
class GuidanceState:
    layout: Layout = field(default_factory=Layout)
    active: torch.Tensor | None = None  # (B,) samples still on full guidance
    delta: torch.Tensor | None = None  # (B, ...) c - u at each sample's last full step (fill="delta")
    delta_time: torch.Tensor | None = None  # (B,) t / t_first at that step
    cosines: list[list[float]] = field(default_factory=list)  # per full-guidance step, per sample
    first_timestep: float | None = None
    uncond_out: list | None = None  # two-call: this step's unconditional outputs (to fill or compare)
    pending: RowPlan | None = None  # two-call: the plan of this step's unconditional call
    cond_out: list | None = None  # two-call, cond first: this step's conditional outputs
    cond_history: list[torch.Tensor] = field(default_factory=list)  # LinearAG / recording: per step
    uncond_history: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # normalised time of each step
    progress: float = 0.0  # 1 - t / t_first of the current step

    @property
    def half(self) -> int:
        return self.layout.half

    @property
    def uncond_first(self) -> bool:
        return self.layout.uncond_first


@dataclass
class _Call:
    plan: RowPlan = field(default_factory=lambda: RowPlan(None, "full"))
    cosine: torch.Tensor | None = None  # AG's per-sample cosine, measured in the compiled epilogue


def _new_state(ctx: CallContext) -> GuidanceState:
    state = GuidanceState()
    ctx.record(TRACE, state.cosines, latest_only=True)
    return state


class GuidancePolicy(Policy):
    """The layout, rows and fills every guidance technique shares; subclasses decide each step's kind."""

    name = "guidance"
    slots = (StateSlot("guidance", _new_state),)
    requires = {"latents": LATENTS}
    Scratch = _Call
    measures_cosine = False  # Adaptive Guidance: the cosine of the two predictions, in the compiled epilogue
    partial_exact = False  # exact steps compute only the still-active samples' unconditional rows

    def __init__(self, config, plan):
        super().__init__(config, plan)
        self._warn = WarnOnce()
        self.evidence = LayoutEvidence(config.uncond_first, plan.null_class, plan.io.position("labels"),
                                       lambda key, message: self._warn(key, message, stacklevel=6))
        last = plan.regions[-1]
        outputs = plan.io.region_outputs[-1]
        self.cosine_output = (outputs.index(plan.io.output_names[0])
                              if self.measures_cosine and last.region.kind == "epilogue"
                              and plan.io.output_names[0] in outputs and variants.COSINE in plan.offers.get(
                                  last.region.name, ()) else None)

    # ------------------------------------------------------------------------------ per-step decision
    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        """This step's kind: "exact" (full guidance), "estimate" (LinearAG), "cond" (guidance off for all)."""
        raise NotImplementedError

    def after_step(self, state: GuidanceState, uncond: torch.Tensor, cond: torch.Tensor, plan: RowPlan,
                   cosine: torch.Tensor | None) -> None:
        """Record what a later step needs from this step's two predictions."""

    # --------------------------------------------------------------------------------------- hooks
    def begin_call(self, ctx: CallContext) -> None:
        state: GuidanceState = ctx.state(self, "guidance")
        info = ctx.info
        if info.index == 0 and info.timestep is not None:
            if info.step == 0:
                state.first_timestep = info.timestep
            if state.first_timestep:
                state.times.append(info.timestep / state.first_timestep)
                state.progress = 1.0 - state.times[-1]
        found = self.evidence.observe(state.layout, ctx)
        if found is not None:
            self._start(state, found.first_call_done)
        plan = RowPlan(None, "full")
        if state.layout.kind == "batched":
            plan = self._plan_batched(state, self.step_kind(state, ctx), ctx.full_rows)
        elif state.layout.kind == "two_call":
            plan = self._plan_two_call(state, ctx, self.step_kind(state, ctx))
        ctx.scratch(self).plan = plan
        ctx.rows = plan.rows if plan.kind != "full" else None

    def run_region(self, ctx: CallContext, call: RegionCall, proceed) -> list:
        plan = ctx.scratch(self).plan
        state: GuidanceState = ctx.state(self, "guidance")
        if self.cosine_output is None or call.rm is not self.plan.regions[-1] or state.layout.kind != "batched":
            return proceed(call)
        pairs = self._measured_pairs(state, plan if ctx.rows is not None else RowPlan(None, "full"))
        if pairs is None:
            return proceed(call)
        device = call.args[0].device if call.args and isinstance(call.args[0], torch.Tensor) else None
        result = call.run(COSINE, [*call.args, pairs[0].to(device), pairs[1].to(device)])
        cos = torch.full((state.half,), float("nan"), dtype=torch.float64)
        cos[pairs[2]] = cosine_from_sums(*(s.detach().cpu() for s in result[-3:]))
        ctx.scratch(self).cosine = cos
        return list(result[:-3])

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        state: GuidanceState = ctx.state(self, "guidance")
        scratch = ctx.scratch(self)
        plan = scratch.plan
        if ctx.rows is None and plan.rows is not None:  # the rows could not be dropped: all were computed
            plan = RowPlan(None, plan.kind if plan.kind != "none" else "partial", plan.copy_from_cond,
                           plan.estimate)
        if state.layout.guided:  # network evaluations per sample of a branch
            computed = ctx.computed_rows
            ctx.nfe, ctx.nfe_skipped = computed / state.half, (ctx.full_rows - computed) / state.half
        if state.layout.kind == "batched":
            return self._complete_batched(state, plan, outputs, scratch.cosine)
        if state.layout.kind == "two_call":
            return self._complete_two_call(state, ctx, plan, outputs)
        self.evidence.keep_first_outputs(state.layout, ctx, outputs)
        return outputs

    def _start(self, state: GuidanceState, first_call_done: bool) -> None:
        """The layout is known: every sample starts on full guidance."""
        layout = state.layout
        state.active = torch.ones(layout.half, dtype=torch.bool)
        if layout.kind == "two_call" and first_call_done:  # the step's first call ran before the layout was known
            if layout.uncond_first:
                state.uncond_out, state.pending = layout.first_out, RowPlan(None, "full")
            else:
                state.cond_out = layout.first_out
        layout.first_out = layout.first_latents = layout.first_labels = None

    # ------------------------------------------------------------------------------------ planning
    def _uncond_rows(self, state: GuidanceState, needed: torch.Tensor, with_rows: int, full: int) -> torch.Tensor:
        """Sample indices whose unconditional row is computed: ``needed`` padded so that the call's rows (these and
        ``with_rows`` others, of ``full``) are a bucket (:func:`~ditfx.runtime.rows.bucket`)."""
        k = int(needed.sum())
        target = min(state.half, bucket(with_rows + k, full) - with_rows) if k or with_rows else 0
        chosen = needed.clone()
        for i in (~needed).nonzero().flatten().tolist()[: target - k]:
            chosen[i] = True
        return chosen.nonzero().flatten()

    def _plan_batched(self, state: GuidanceState, kind: str, full: int) -> RowPlan:
        h = state.half
        if kind == "exact" and (not self.partial_exact or bool(state.active.all())):
            return RowPlan(None, "full")
        u0, c0 = (0, h) if state.uncond_first else (h, 0)
        needed = state.active if kind == "exact" else torch.zeros(h, dtype=torch.bool)
        samples = self._uncond_rows(state, needed, h, full)
        rows = torch.cat([samples + u0, torch.arange(h) + c0]).sort().values
        return RowPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten(), estimate=kind == "estimate")

    def _is_uncond_call(self, state: GuidanceState, ctx: CallContext) -> bool:
        if state.layout.named:
            return ctx.info.branch == "uncond"
        return (ctx.info.index == 0) == state.uncond_first

    def _plan_two_call(self, state: GuidanceState, ctx: CallContext, kind: str) -> RowPlan:
        if not self._is_uncond_call(state, ctx):  # (a named layout is known from step 0's first call)
            return RowPlan(None, "full")
        if kind == "exact" and (bool(state.active.all()) or not self.partial_exact):
            return RowPlan(None, "full")
        needed = state.active if kind == "exact" else torch.zeros(state.half, dtype=torch.bool)
        if not bool(needed.any()):
            return RowPlan(torch.zeros(0, dtype=torch.long), "none", copy_from_cond=torch.arange(state.half),
                           estimate=kind == "estimate")
        rows = self._uncond_rows(state, needed, 0, ctx.full_rows)
        return RowPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten())

    def _measured_pairs(self, state: GuidanceState, plan: RowPlan):
        """Where this call's output holds the predictions AG compares: ``(uncond rows, cond rows, samples)``
        positions in the computed rows, for the compiled epilogue to reduce; None when nothing is measured."""
        if not bool(state.active.any()):
            return None
        h = state.half
        u0, c0 = (0, h) if state.uncond_first else (h, 0)
        if plan.rows is None:
            samples = torch.arange(h)
            return samples + u0, samples + c0, samples
        computed = plan.rows[(plan.rows >= u0) & (plan.rows < u0 + h)] - u0  # samples with their uncond row
        if not len(computed):
            return None
        return (torch.searchsorted(plan.rows, computed + u0), torch.searchsorted(plan.rows, computed + c0),
                computed)

    # ---------------------------------------------------------------------------------- completion
    def _scatter(self, plan: RowPlan, outs: list, rows: int) -> list:
        if plan.rows is None:
            return list(outs)
        full = []
        for o in outs:
            if is_per_row(o, len(plan.rows)):
                base = o.new_empty((rows, *o.shape[1:]))
                full.append(base.index_copy(0, plan.rows.to(o.device), o))
            else:
                full.append(o)
        return full

    @staticmethod
    def _halves(o: torch.Tensor, h: int, uncond_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (o[:h], o[h:]) if uncond_first else (o[h:], o[:h])

    def _complete_batched(self, state: GuidanceState, plan: RowPlan, outs: list, cosine=None) -> list:
        h, first = state.half, state.uncond_first
        full = self._scatter(plan, outs, 2 * h)
        pred = full[0]
        uncond, cond = self._halves(pred, h, first)
        if plan.estimate:
            estimate = self._estimate(state, cond)
            for o in full:
                if is_per_row(o, 2 * h):
                    self._halves(o, h, first)[0].copy_(estimate if o is pred else self._halves(o, h, first)[1])
        elif plan.copy_from_cond is not None and len(plan.copy_from_cond):
            for o in full:
                if is_per_row(o, 2 * h):
                    u, c = self._halves(o, h, first)
                    u[plan.copy_from_cond] = self._switched_uncond(state, plan.copy_from_cond, c, o is pred)
        self.after_step(state, uncond, cond, plan, cosine)
        return full

    def _complete_two_call(self, state: GuidanceState, ctx: CallContext, plan: RowPlan, outs: list) -> list:
        h = state.half
        if self._is_uncond_call(state, ctx):
            if plan.kind == "none":  # nothing computed: a fresh buffer for the slot
                full = [torch.empty_like(o) if is_per_row(o, h) else o for o in outs]
            else:
                full = self._scatter(plan, outs, h)
            if state.cond_out is None:  # the conditional call comes next: it fills the slot and measures
                state.uncond_out, state.pending = full, plan
            else:
                self._fill_uncond(state, plan, full, state.cond_out)
                self.after_step(state, full[0], state.cond_out[0], plan, None)
                state.cond_out = None
            return full
        if state.uncond_out is not None:
            self._fill_uncond(state, state.pending, state.uncond_out, outs)
            self.after_step(state, state.uncond_out[0], outs[0], state.pending, None)
            state.uncond_out = state.pending = None
        else:
            state.cond_out = list(outs)
        return list(outs)

    def _fill_uncond(self, state: GuidanceState, plan: RowPlan, uncond_full: list, cond_full: list) -> None:
        if plan.estimate:
            uncond_full[0].copy_(self._estimate(state, cond_full[0]))
            return
        idx = plan.copy_from_cond
        if idx is not None and len(idx):
            for k, (u, c) in enumerate(zip(uncond_full, cond_full)):
                if is_per_row(u, state.half):
                    u[idx] = self._switched_uncond(state, idx, c, k == 0)

    def _switched_uncond(self, state: GuidanceState, idx: torch.Tensor, cond: torch.Tensor, is_pred: bool):
        """The unconditional slot of switched samples ``idx``: their conditional output, less (for the prediction,
        with ``fill="delta"``) the guidance direction of their last full step scaled by (t / t_switch) ** fade."""
        if not is_pred or state.delta is None:
            return cond[idx]
        # (t / t_switch) ** fade
        scale = ((1.0 - state.progress) / state.delta_time[idx].clamp_min(1e-12)) ** self.config.fade
        scale = scale.to(cond.device, cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
        return cond[idx] - state.delta[idx].to(cond.device) * scale

    def _estimate(self, state: GuidanceState, cond: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{type(self.config).__name__} does not estimate unconditional predictions")


def cosine_from_sums(dot: torch.Tensor, uu: torch.Tensor, cc: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``torch.cosine_similarity``'s formula from the three sums the compiled epilogue returns."""
    return dot / (uu * cc).clamp_min(eps * eps).sqrt()


@register_policy(AdaptiveGuidance)
class AdaptiveGuidancePolicy(GuidancePolicy):
    """Adaptive Guidance: a sample's guidance stops once its two predictions agree (cosine >= gamma)."""

    measures_cosine = True
    partial_exact = True

    def describe(self, steps: int) -> dict:
        cfg = self.config
        fill = ("the last guidance direction, fading with (t / t_switch) ** " f"{cfg.fade}" if cfg.fill == "delta"
                else "the conditional prediction (guidance ends)")
        return {"kind": "adaptive", "gamma": cfg.gamma, "per_sample": cfg.per_sample, "warmup": cfg.warmup,
                "fill": cfg.fill, "fade": cfg.fade,
                "description": (f"full guidance until a {'sample' if cfg.per_sample else 'batch'}'s conditional "
                                f"and unconditional predictions reach cosine {cfg.gamma}"
                                f"{f' (not before progress {cfg.warmup})' if cfg.warmup else ''}; then its "
                                f"unconditional rows are not computed and its slot holds {fill}")}

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        return "exact" if bool(state.active.any()) else "cond"

    def after_step(self, state, uncond, cond, plan, cosine) -> None:
        if not bool(state.active.any()):
            return
        cos = cosine if cosine is not None else torch.cosine_similarity(
            cond.flatten(1).double(), uncond.flatten(1).double(), dim=1).cpu()
        measured = state.active.clone()
        if plan.copy_from_cond is not None:
            measured[plan.copy_from_cond] = False
        state.cosines.append([float(c) if m else float("nan") for c, m in zip(cos, measured)])
        if state.progress < self.config.warmup:
            return
        reached = (cos >= self.config.gamma) & measured
        before = state.active.clone()
        if self.config.per_sample:
            state.active &= ~reached
        elif bool(reached[state.active].all()):
            state.active[:] = False
        switched = before & ~state.active
        if self.config.fill == "delta" and bool(switched.any()):
            if state.delta is None:
                state.delta = torch.zeros_like(cond)
                state.delta_time = torch.ones(state.half, dtype=torch.float64)
            state.delta[switched] = (cond - uncond)[switched]
            state.delta_time[switched] = 1.0 - state.progress


@register_policy(GuidanceWindow)
class GuidanceWindowPolicy(GuidancePolicy):
    """Guidance only while the generation's progress is inside [start, stop)."""

    requires = {"latents": LATENTS, "timestep": TIMESTEP}

    def describe(self, steps: int) -> dict:
        guided = [int(self.config.start <= k / steps < self.config.stop) for k in range(steps)]
        return {"kind": "window", "start": self.config.start, "stop": self.config.stop, "steps": steps,
                "guided": guided, "nfe": steps + sum(guided),
                "description": f"full guidance while progress is in [{self.config.start}, {self.config.stop}): "
                               f"{sum(guided)} of {steps} uniform steps"}

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        return "exact" if self.config.start <= state.progress < self.config.stop else "cond"


def _new_recording(ctx: CallContext) -> GuidanceState:
    state = _new_state(ctx)
    ctx.record(RECORDING, state)
    return state


class _KeepsPredictions(GuidancePolicy):
    """Keeps both predictions of every full-guidance step (LinearAG's regressors, calibration's data)."""

    def after_step(self, state, uncond, cond, plan, cosine) -> None:
        state.cond_history.append(cond.detach().clone())
        state.uncond_history.append(uncond.detach().clone())


@register_policy(LinearAG)
class LinearAGPolicy(_KeepsPredictions):
    """LinearAG: exact steps alternate with estimated ones in the first half, conditional only after."""

    requires = {"latents": LATENTS, "timestep": TIMESTEP}

    def describe(self, steps: int) -> dict:
        fitted = self.config.coefficients.steps
        kinds = [linear_ag.step_kind(k, fitted) for k in range(fitted)]
        return {"kind": "linear", "steps": fitted, "step_kinds": kinds,
                "nfe": sum(2 if k == "exact" else 1 for k in kinds),
                "description": (f"fitted for {fitted} steps (other step counts are refused): exact guidance and "
                                "estimated unconditional predictions alternate in the first half, conditional only "
                                "after")}

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        coeffs = self.config.coefficients
        step = ctx.info.step
        if step >= coeffs.steps:
            raise RuntimeError(f"LinearAG coefficients were fitted for {coeffs.steps} steps; this generation "
                               f"has more. Fit them for this step count with ditfx.calibrate_guidance")
        u = ctx.info.timestep / state.first_timestep if state.first_timestep else 1.0
        if abs(u - coeffs.times[step]) > 1e-3:
            raise RuntimeError(f"LinearAG coefficients were fitted on another step grid (step {step} at "
                               f"normalised time {coeffs.times[step]:.4f}, this generation "
                               f"{u:.4f}); fit them for this scheduler and step count")
        return linear_ag.step_kind(step, coeffs.steps)

    def _estimate(self, state: GuidanceState, cond: torch.Tensor) -> torch.Tensor:
        k = len(state.cond_history)
        betas = self.config.coefficients.betas[k]
        cols = linear_ag.features(state.cond_history + [cond], state.uncond_history, k,
                                  self.config.coefficients.window)
        return linear_ag.combine(betas, cols)


@register_policy(GuidanceRecording)
class GuidanceRecordingPolicy(_KeepsPredictions):
    """Full guidance, recording both predictions per step (``ditfx.calibrate_guidance``)."""

    slots = (StateSlot("guidance", _new_recording),)

    def describe(self, steps: int) -> dict:
        return {"kind": "recording", "description": "full guidance; both predictions of every step are recorded"}

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        return "exact"
