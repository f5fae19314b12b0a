"""Guidance skipping at run time: which rows of a classifier-free-guidance call to compute, and how to fill the
rest so that an unchanged pipeline's ``u + s * (c - u)`` gives the intended prediction.

The CFG layout of a generation is determined, not assumed, from the first evidence available:

1. the pipeline's names for its calls (``transformer.cache_context``): ``"cond"`` / ``"uncond"`` are the two
   calls of a step, ``"cond_uncond"`` one batched call;
2. the null class, where the model has one: the half (or call) whose class labels are all the null class is
   the unconditional one; a batch whose halves share latents but neither half is null is not guidance (one noise
   for two classes);
3. the config's ``uncond_first`` where the caller states it (a warning where the null class contradicts it);
4. otherwise diffusers' conventions: batched calls put the unconditional half first, two-call steps call the
   conditional branch first.

Without names, a batched layout is a call of 2B rows whose halves have equal latents, and a two-call layout two
calls of one step with equal latents. The evidence is checked again on every call: when the halves (or the two
calls) stop sharing latents, this was not guidance, and skipping stops for the generation with a warning,
before anything was filled (a first step always computes every row).

A sample whose guidance is off gets its conditional prediction in its unconditional slot (exactly ``c`` after
the pipeline's combine), less the fading last guidance direction with ``fill="delta"``; LinearAG puts its
estimate there. In the two-call layout with the unconditional call first, that slot is returned before the
conditional call runs, so it is filled in place when the conditional call returns (pipelines combine after both
calls). Rows are computed in a few bucket sizes (a quarter of the branch at a time, padded with rows that are
computed and discarded), so per-sample switching compiles at most five batch sizes per region.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ditfx.config import AdaptiveGuidance, GuidanceRecording, GuidanceWindow, LinearAG
from ditfx.runtime import linear_ag
from ditfx.runtime.policy import CallContext, Policy, RegionCall, StateSlot, register_policy
from ditfx.runtime.rows import is_per_row

BUCKETS = 4  # unconditional rows are computed in multiples of ceil(B / BUCKETS)
COSINE = ("guidance.cosine",)  # the epilogue variant that also returns AG's sums (passes/guidance.py)
TRACE = "guidance_cosines"  # record: per generation, AG's per-step, per-sample cosines
RECORDING = "guidance_recording"  # record: per generation, the full-guidance predictions
NO_CFG = ("no classifier-free guidance found in the denoiser's calls (neither a batch whose halves share latents "
          "nor two calls per step with equal latents)")


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
    uncond_first: bool = True  # batched: the unconditional half is first; two-call: the unconditional call is
    named: bool = False  # two-call calls carry the pipeline's branch names
    half: int = 0  # B: samples per branch
    active: torch.Tensor | None = None  # (B,) samples still on full guidance
    delta: torch.Tensor | None = None  # (B, ...) c - u at each sample's last full step (fill="delta")
    delta_time: torch.Tensor | None = None  # (B,) t / t_first at that step
    cosines: list[list[float]] = field(default_factory=list)  # per full-guidance step, per sample
    first_latents: torch.Tensor | None = None
    first_labels: torch.Tensor | None = None
    first_timestep: float | None = None
    first_out: list | None = None  # outputs of the first call, until the layout is known
    step_latents: torch.Tensor | None = None  # two-call: the latents of this step's first call
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


def _new_state(ctx: CallContext) -> GuidanceState:
    state = GuidanceState()
    ctx.record(TRACE, state.cosines, latest_only=True)
    return state


class GuidancePolicy(Policy):
    """The layout, rows and fills every guidance technique shares; subclasses decide each step's kind."""

    name = "guidance"
    slots = (StateSlot("guidance", _new_state),)
    measures_cosine = False  # Adaptive Guidance: the cosine of the two predictions, in the compiled epilogue
    partial_exact = False  # exact steps compute only the still-active samples' unconditional rows

    def __init__(self, cfg, plan):
        super().__init__(cfg, plan)
        self.cfg = cfg
        self.null_class = plan.null_class
        self.labels_pos = plan.io.position("labels")
        self._warned: set[str] = set()
        last = plan.regions[-1]
        outputs = plan.io.region_outputs[-1]
        self.cosine_output = (outputs.index(plan.io.output_names[0])
                              if self.measures_cosine and last.region.kind == "epilogue"
                              and plan.io.output_names[0] in outputs and "guidance.cosine" in plan.offers.get(
                                  last.region.name, ()) else None)

    # ------------------------------------------------------------------------------ per-step decision
    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        """This step's kind: "exact" (full guidance), "estimate" (LinearAG), "cond" (guidance off for all)."""
        raise NotImplementedError

    def after_step(self, state: GuidanceState, uncond: torch.Tensor, cond: torch.Tensor, plan: CallPlan,
                   cosine: torch.Tensor | None) -> None:
        """Record what a later step needs from this step's two predictions."""

    # --------------------------------------------------------------------------------------- hooks
    def begin_call(self, ctx: CallContext) -> None:
        state: GuidanceState = ctx.state(self, "guidance")
        info = ctx.info
        latents = ctx.input("latents")
        if info.index == 0 and info.timestep is not None:
            if info.step == 0:
                state.first_timestep = info.timestep
            if state.first_timestep:
                state.times.append(info.timestep / state.first_timestep)
                state.progress = 1.0 - state.times[-1]
        if state.layout is None:
            self._detect(state, ctx, latents)
        elif state.layout != "none" and not self._still_guidance(state, ctx, latents):
            self._not_guidance(state, "the branches stopped sharing latents")
        plan = CallPlan(None, "full")
        if state.layout == "batched":
            plan = self._plan_batched(state, self.step_kind(state, ctx))
        elif state.layout == "two_call":
            plan = self._plan_two_call(state, ctx, self.step_kind(state, ctx))
        ctx.scratch[self.name] = plan
        ctx.rows = plan.rows if plan.kind != "full" else None

    def run_region(self, ctx: CallContext, call: RegionCall, proceed) -> list:
        plan: CallPlan = ctx.scratch[self.name]
        state: GuidanceState = ctx.state(self, "guidance")
        if self.cosine_output is None or call.rm is not self.plan.regions[-1] or state.layout != "batched":
            return proceed(call)
        pairs = self._measured_pairs(state, plan if ctx.rows is not None else CallPlan(None, "full"))
        if pairs is None:
            return proceed(call)
        device = call.args[0].device if call.args and isinstance(call.args[0], torch.Tensor) else None
        result = call.run(COSINE, [*call.args, pairs[0].to(device), pairs[1].to(device)])
        cos = torch.full((state.half,), float("nan"), dtype=torch.float64)
        cos[pairs[2]] = cosine_from_sums(*(s.detach().cpu() for s in result[-3:]))
        ctx.scratch[self.name + ".cosine"] = cos
        return list(result[:-3])

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        state: GuidanceState = ctx.state(self, "guidance")
        plan: CallPlan = ctx.scratch[self.name]
        if ctx.rows is None and plan.rows is not None:  # the rows could not be dropped: all were computed
            plan = CallPlan(None, plan.kind if plan.kind != "none" else "partial", plan.copy_from_cond,
                            plan.estimate)
        if state.layout in ("batched", "two_call"):  # network evaluations per sample of a branch
            computed = ctx.full_rows if ctx.rows is None else len(ctx.rows)
            ctx.nfe, ctx.nfe_skipped = computed / state.half, (ctx.full_rows - computed) / state.half
        cosine = ctx.scratch.get(self.name + ".cosine")
        if state.layout == "batched":
            return self._complete_batched(state, plan, outputs, cosine)
        if state.layout == "two_call":
            return self._complete_two_call(state, ctx, plan, outputs)
        if state.layout is None and ctx.info.step == 0 and ctx.info.index == 0:
            state.first_out = list(outputs)  # kept until the next call tells whether this step has two calls
        return outputs

    # -------------------------------------------------------------------------------------- layout
    def _labels(self, ctx: CallContext) -> torch.Tensor | None:
        if self.null_class is None or self.labels_pos is None:
            return None
        labels = ctx.args[self.labels_pos]
        return labels if isinstance(labels, torch.Tensor) and labels.dim() == 1 else None

    def _detect(self, state: GuidanceState, ctx: CallContext, latents: torch.Tensor) -> None:
        """Called on each call until the layout of the generation is known."""
        info, name = ctx.info, ctx.info.branch
        rows = latents.shape[0]
        if name in ("cond", "uncond"):  # the pipeline names the two calls of a step
            state.layout, state.named, state.half = "two_call", True, rows
            state.uncond_first = name == "uncond" if info.index == 0 else name != "uncond"
            return self._start(state, first_call_done=info.index > 0)
        if info.step > 0 or info.index > 1:  # a whole step went by with one call and no equal halves
            return self._not_guidance(state, NO_CFG)
        labels = self._labels(ctx)
        if info.index == 0:
            h = rows // 2
            if rows % 2 == 0 and bool(torch.equal(latents[:h], latents[h:])):
                order = self._batched_order(labels, h, named=name == "cond_uncond")
                if order is None:
                    return self._not_guidance(state, "the batch's halves share latents but neither half holds "
                                              "only the null class: one noise for several classes, not guidance")
                state.layout, state.half, state.uncond_first = "batched", h, order
                return self._start(state)
            if name == "cond_uncond":
                return self._not_guidance(state, "the pipeline names a batched guidance call whose halves do not "
                                          "share latents")
            state.first_latents, state.first_labels = latents, labels
            return
        if state.first_latents is not None and state.first_latents.shape == latents.shape and bool(
                torch.equal(state.first_latents, latents)):
            state.layout, state.half = "two_call", rows
            order = self._two_call_order(state.first_labels, labels)
            if order is None:
                return self._not_guidance(state, "two calls share latents but neither holds only the null class")
            state.uncond_first = order
            return self._start(state, first_call_done=True)
        self._not_guidance(state, NO_CFG)

    def _batched_order(self, labels: torch.Tensor | None, h: int, named: bool) -> bool | None:
        """Whether the unconditional half comes first; None: the halves are not guidance."""
        parts = (labels[:h], labels[h:]) if labels is not None else None
        return self._order(parts, "half", default=True, named=named)

    def _two_call_order(self, first_labels, labels) -> bool | None:
        """Whether the unconditional call comes first; None: the two calls are not guidance."""
        parts = (first_labels, labels) if first_labels is not None and labels is not None else None
        return self._order(parts, "call", default=False, named=False)

    def _order(self, parts, what: str, default: bool, named: bool) -> bool | None:
        """The order from the null class in ``parts`` (the two halves' or calls' labels), else the stated one,
        else ``default`` (diffusers' convention); None when the data say it is not guidance."""
        stated = self.cfg.uncond_first
        if parts is not None:
            first, second = (bool((p == self.null_class).all()) for p in parts)
            if first != second:
                if stated is not None and stated != first:
                    self._warn("order", f"ditfx guidance: uncond_first={stated} but the null class "
                               f"({self.null_class}) is in the {'first' if first else 'second'} {what}; "
                               "following the data")
                return first
            if not first and not named:
                return None
        return default if stated is None else stated

    def _start(self, state: GuidanceState, first_call_done: bool = False) -> None:
        state.active = torch.ones(state.half, dtype=torch.bool)
        if state.layout == "two_call" and first_call_done:  # the step's first call ran before the layout was known
            if state.uncond_first:
                state.uncond_out, state.pending = state.first_out, CallPlan(None, "full")
            else:
                state.cond_out = state.first_out
        state.first_out = state.first_latents = state.first_labels = None

    def _still_guidance(self, state: GuidanceState, ctx: CallContext, latents: torch.Tensor) -> bool:
        """The layout's evidence, checked on every call: the halves (or the step's calls) share latents."""
        if state.layout == "batched":
            h = state.half
            return latents.shape[0] == 2 * h and bool(torch.equal(latents[:h], latents[h:]))
        if ctx.info.index == 0:
            state.step_latents = latents
            return True
        return state.step_latents is None or (state.step_latents.shape == latents.shape
                                              and bool(torch.equal(state.step_latents, latents)))

    def _not_guidance(self, state: GuidanceState, why: str) -> None:
        if state.layout not in (None, "none"):
            why = f"{why}; guidance skipping is off for the rest of this generation"
        else:
            why = f"{why}; guidance skipping is off for this generation"
        state.layout = "none"
        state.first_out = state.first_latents = state.first_labels = None
        self._warn(why, f"ditfx guidance: {why}")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=5)

    # ------------------------------------------------------------------------------------ planning
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
        if kind == "exact" and (not self.partial_exact or bool(state.active.all())):
            return CallPlan(None, "full")
        u0, c0 = (0, h) if state.uncond_first else (h, 0)
        needed = state.active if kind == "exact" else torch.zeros(h, dtype=torch.bool)
        samples = self._uncond_rows(state, needed)
        rows = torch.cat([samples + u0, torch.arange(h) + c0]).sort().values
        return CallPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten(), estimate=kind == "estimate")

    def _is_uncond_call(self, state: GuidanceState, ctx: CallContext) -> bool:
        if state.named:
            return ctx.info.branch == "uncond"
        return (ctx.info.index == 0) == state.uncond_first

    def _plan_two_call(self, state: GuidanceState, ctx: CallContext, kind: str) -> CallPlan:
        if not self._is_uncond_call(state, ctx):  # (a named layout is known from step 0's first call)
            return CallPlan(None, "full")
        if kind == "exact" and (bool(state.active.all()) or not self.partial_exact):
            return CallPlan(None, "full")
        needed = state.active if kind == "exact" else torch.zeros(state.half, dtype=torch.bool)
        if not bool(needed.any()):
            return CallPlan(torch.zeros(0, dtype=torch.long), "none", copy_from_cond=torch.arange(state.half),
                            estimate=kind == "estimate")
        rows = self._uncond_rows(state, needed)
        return CallPlan(rows, "partial", copy_from_cond=(~needed).nonzero().flatten())

    def _measured_pairs(self, state: GuidanceState, plan: CallPlan):
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
    def _scatter(self, plan: CallPlan, outs: list, rows: int) -> list:
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

    def _complete_batched(self, state: GuidanceState, plan: CallPlan, outs: list, cosine=None) -> list:
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

    def _complete_two_call(self, state: GuidanceState, ctx: CallContext, plan: CallPlan, outs: list) -> list:
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

    def _fill_uncond(self, state: GuidanceState, plan: CallPlan, uncond_full: list, cond_full: list) -> None:
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
        scale = ((1.0 - state.progress) / state.delta_time[idx].clamp_min(1e-12)) ** self.cfg.fade  # (t/t_switch)^fade
        scale = scale.to(cond.device, cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
        return cond[idx] - state.delta[idx].to(cond.device) * scale

    def _estimate(self, state: GuidanceState, cond: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{type(self.cfg).__name__} does not estimate unconditional predictions")


def cosine_from_sums(dot: torch.Tensor, uu: torch.Tensor, cc: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``torch.cosine_similarity``'s formula from the three sums the compiled epilogue returns."""
    return dot / (uu * cc).clamp_min(eps * eps).sqrt()


def _needs_timestep(policy: GuidancePolicy, ctx: CallContext) -> None:
    if ctx.info.timestep is None:
        raise RuntimeError(f"{type(policy.cfg).__name__} follows the generation's timesteps, and this graph has no "
                           "timestep input that ditfx recognises; use AdaptiveGuidance")


@register_policy(AdaptiveGuidance)
class AdaptiveGuidancePolicy(GuidancePolicy):
    """Adaptive Guidance: a sample's guidance stops once its two predictions agree (cosine >= gamma)."""

    measures_cosine = True
    partial_exact = True

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


@register_policy(GuidanceWindow)
class GuidanceWindowPolicy(GuidancePolicy):
    """Guidance only while the generation's progress is inside [start, stop)."""

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        _needs_timestep(self, ctx)
        return "exact" if self.cfg.start <= state.progress < self.cfg.stop else "cond"


def _new_recording(ctx: CallContext) -> GuidanceState:
    state = _new_state(ctx)
    ctx.record(RECORDING, state)
    return state


class _HistoryPolicy(GuidancePolicy):
    """Keeps both predictions of every full-guidance step (LinearAG's regressors, calibration's data)."""

    def after_step(self, state, uncond, cond, plan, cosine) -> None:
        state.cond_history.append(cond.detach().clone())
        state.uncond_history.append(uncond.detach().clone())


@register_policy(LinearAG)
class LinearAGPolicy(_HistoryPolicy):
    """LinearAG: exact steps alternate with estimated ones in the first half, conditional only after."""

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        _needs_timestep(self, ctx)
        coeffs = self.cfg.coefficients
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
        betas = self.cfg.coefficients.betas[k]
        cols = linear_ag.features(state.cond_history + [cond], state.uncond_history, k, self.cfg.coefficients.window)
        return linear_ag.combine(betas, cols)


@register_policy(GuidanceRecording)
class GuidanceRecordingPolicy(_HistoryPolicy):
    """Full guidance, recording both predictions per step (``ditfx.calibrate_guidance``)."""

    slots = (StateSlot("guidance", _new_recording),)

    def step_kind(self, state: GuidanceState, ctx: CallContext) -> str:
        return "exact"
