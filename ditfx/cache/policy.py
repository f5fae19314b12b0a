"""Block caching's policies: per-step decisions (dynamic, static, calibration) and their per-branch state.

Each policy decides, block by block, whether a block runs or reuses what it cached; state lives per
generation and per branch (the calls of one step), and per sample inside a batch. The block-cache pass offers
the variants they run: ``cache.residual`` (the block, also returning what is cached) and ``cache.probe`` (also
the change sums of the probe block).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import ditfx.cache.variants as variants
from ditfx.cache.change import relative_l1_from_sums
from ditfx.cache.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.cache.schedule import CacheSchedule
from ditfx.graph.regions import RegionModule
from ditfx.runtime.lifecycle import CallInfo
from ditfx.runtime.policy import CallContext, Policy, RegionCall, StateSlot, register_policy

RESIDUAL = (variants.RESIDUAL,)
PROBE = (variants.PROBE,)
TIMESTEP = "to place each step on the schedule's normalised time (DynamicCache needs no timestep)"

def split_cached(rm: RegionModule, outs: tuple) -> tuple[list, list]:
    """Split a residual variant's outputs into the block outputs and the cached values (one per stream)."""
    n = len(rm.region.outputs)
    return list(outs[:n]), list(outs[n:n + len(rm.region.streams)])


@dataclass
class CachedValues:
    """A block's cached values (one per stream) at the step each sample last computed it, and, for a linear
    forecast, their rate of change along the time between its last two computed steps."""

    values: list[torch.Tensor]
    time: torch.Tensor  # (B,): when each sample last computed the block
    slopes: list[torch.Tensor] | None  # d value / d time per stream; None: reuse as is

    @classmethod
    def first(cls, values: list, time: float, forecast: str) -> CachedValues:
        v = values[0]
        slopes = [torch.zeros_like(x) for x in values] if forecast == "linear" else None
        return cls(values, torch.full((v.shape[0],), float(time), dtype=torch.float32, device=v.device), slopes)

    def update(self, values: list, time: float, computed: torch.Tensor | None = None) -> None:
        """Take the newly computed ``values`` for the samples in ``computed`` (None: all of them)."""
        if self.slopes is not None:
            dt = time - self.time  # (B,)
            inv = torch.where(dt == 0, 0.0, 1.0 / dt)
            self.slopes = [_where(computed, torch.sub(new, old).mul_(_per_sample(inv.to(new.dtype), new)), s)
                           for new, old, s in zip(values, self.values, self.slopes)]
        self.values = [_where(computed, new, old) for new, old in zip(values, self.values)]
        self.time = _where(computed, torch.full_like(self.time, float(time)), self.time)

    def reuse(self, inputs: list[torch.Tensor], time: float, residual: bool) -> list[torch.Tensor]:
        """Per stream, the input plus the cached value forecast for ``time`` (``residual``), or that value alone:
        one new tensor per stream, the forecast added in place."""
        dt = None if self.slopes is None else time - self.time
        outs = []
        for k, v in enumerate(self.values):
            if not residual and dt is None:
                outs.append(v)
                continue
            out = torch.add(inputs[k], v) if residual else v.clone()
            if dt is not None:  # x + v + dt * s in two passes over one output, not four over three tensors
                out.addcmul_(_per_sample(dt.to(v.dtype), v), self.slopes[k])
            outs.append(out)
        return outs


def _where(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new if mask is None else torch.where(_per_sample(mask, new), new, old)


def step_time(info: CallInfo) -> float:
    """The time a forecast extrapolates along: the denoiser's timestep, or the step index without one."""
    return float(info.step) if info.timestep is None else info.timestep


def reuse_outputs(rm: RegionModule, args: list, entry: CachedValues, time: float, mode: str) -> list:
    """A skipped block's outputs: its current stream inputs plus the cached residuals (or the cached outputs),
    forecast for ``time``."""
    outs: list = [None] * len(rm.region.outputs)
    values = entry.reuse([args[i] for _, i in rm.region.streams], time, mode == "residual")
    for (o, _), value in zip(rm.region.streams, values):
        outs[o] = value
    return outs


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _DynamicState:
    ref: torch.Tensor | None = None  # probe's cached value at the last computed step, per sample
    cached: dict[int, CachedValues] = field(default_factory=dict)
    reuse: torch.Tensor | None = None  # consecutive reuses per sample


@dataclass
class _Decision:
    """This call's decision, made after the probe block."""

    skip: torch.Tensor | None = None  # per sample of the computed rows
    skip_all: bool = False
    skip_any: bool = False


class _CachePolicy(Policy):
    """What the block-cache policies share: the blocks they may skip, and the block loop around them."""

    name = "cache"

    def __init__(self, config, plan):
        super().__init__(config, plan)
        self.cacheable = set(plan.blocks_offering(variants.RESIDUAL))

    def run_region(self, ctx: CallContext, call: RegionCall, proceed) -> list:
        region = call.region
        if region.kind != "block":
            return proceed(call)
        return self.run_block(ctx, call, region.block.index, proceed)

    def run_block(self, ctx: CallContext, call: RegionCall, index: int, proceed) -> list:
        raise NotImplementedError


@register_policy(DynamicCache)
class DynamicCachePolicy(_CachePolicy):
    """First-block-cache style: block ``first-1``'s change decides whether the middle blocks run."""

    slots = (StateSlot("cache", lambda ctx: _DynamicState(), scope="branch", per_row=True, per_mode=True),)
    Scratch = _Decision

    def __init__(self, config: DynamicCache, plan):
        super().__init__(config, plan)
        cfg = config
        # first and last count along the blocks that carry the latents (a text-only refiner always runs)
        latent = [r.block.index for r in plan.structure.block_regions if r.latent_stream]
        self.probe = latent[cfg.first - 1]
        self.middle = {i for i in latent[cfg.first:len(latent) - cfg.last] if i in self.cacheable}

    def describe(self, steps: int) -> dict:
        cfg, blocks = self.config, self.plan.block_names
        skippable = [blocks[i] for i in sorted(self.middle)]
        probe = blocks[self.probe]
        return {"kind": "dynamic", "threshold": cfg.threshold,
                "always_run": [b for i, b in enumerate(blocks) if i not in self.middle],
                "probe": probe, "skippable": skippable,
                "description": (f"{probe}'s residual change against the last computed step decides, "
                                f"per {'sample' if cfg.per_sample else 'batch'}: below {cfg.threshold} the "
                                f"{len(skippable)} middle blocks reuse their cached residuals")}

    def run_block(self, ctx: CallContext, call: RegionCall, index: int, proceed) -> list:
        if index == self.probe:
            return self._run_probe(ctx, call)
        if index not in self.middle:
            return proceed(call)
        state, decision = ctx.state(self, "cache"), ctx.scratch(self)
        rm, args, mode = call.rm, call.args, self.config.mode
        time = step_time(ctx.info)
        if decision.skip_all:
            return call.reuse(reuse_outputs(rm, args, state.cached[index], time, mode))
        entry = state.cached.get(index)
        if entry is not None and decision.skip_any:  # mixed batch: every sample keeps its own decision
            computing = ~decision.skip
            reused = reuse_outputs(rm, args, entry, time, mode)
            ids = computing.nonzero().flatten()
            part = call.run_on_rows(RESIDUAL, args, ids)
            if part is not None:  # only the computing rows ran: scatter them over the reused ones
                outs, cached = split_cached(rm, part)
                outs = [r.index_copy(0, ids, o) for r, o in zip(reused, outs)]
                cached = [v.index_copy(0, ids, c) for v, c in zip(entry.values, cached)]
            else:
                outs, cached = split_cached(rm, call.run(RESIDUAL))
                for o, _ in rm.region.streams:
                    outs[o] = torch.where(_per_sample(decision.skip, outs[o]), reused[o], outs[o])
            entry.update(cached, time, computing)
            return outs
        outs, cached = split_cached(rm, call.run(RESIDUAL))
        if entry is None:
            state.cached[index] = CachedValues.first(cached, time, self.config.forecast)
        else:
            entry.update(cached, time)
        return outs

    def _run_probe(self, ctx: CallContext, call: RegionCall) -> list:
        state, decision = ctx.state(self, "cache"), ctx.scratch(self)
        rm = call.rm
        primary = rm.region.primary_stream
        if state.ref is None:
            outs, cached = split_cached(rm, call.run(RESIDUAL))
            state.ref = cached[primary]
            return outs
        result = call.run(PROBE, [*call.args, state.ref])
        outs, cached = split_cached(rm, result[:-2])
        # every rank of a context-parallel group decides from the whole sequence's sums
        num, den = ctx.group_sum("DynamicCache's change", result[-2], result[-1])
        cfg = self.config
        if cfg.per_sample:
            change = relative_l1_from_sums(num, den)
        else:  # one decision for the batch: the change of all samples together
            change = relative_l1_from_sums(num.sum(), den.sum()).expand_as(num)
        skip = change < cfg.threshold  # NaN compares False: a sample with a NaN change computes
        if state.reuse is None:
            state.reuse = torch.zeros_like(num, dtype=torch.int64)
        if cfg.max_reuse is not None:
            skip &= state.reuse < cfg.max_reuse
        ready = ctx.info.step >= cfg.warmup and all(i in state.cached for i in self.middle)
        skip &= ready
        decided = skip.tolist()  # the one host sync of the step
        decision.skip, decision.skip_all, decision.skip_any = skip, all(decided), any(decided)
        state.reuse = torch.where(skip, state.reuse + 1, 0)
        # the reference moves only where the sample computes, so change accumulates over reused steps
        state.ref = torch.where(_per_sample(skip, cached[primary]), state.ref, cached[primary])
        return outs


@dataclass
class _StaticState:
    acc: list[float]
    u_prev: float | None = None
    compute: list[bool] = field(default_factory=list)
    cached: dict[int, CachedValues] = field(default_factory=dict)
    chain_sum: CachedValues | None = None  # the chain's cached values summed (blocks reused together)


def back_to_back(plan, blocks: list[int]) -> bool:
    """Whether ``blocks`` run one after the other with nothing between them, each block's stream inputs being
    exactly the previous block's stream outputs (in order) and read by nothing else: then reusing the chain is
    adding the sum of its cached values once, and the blocks after the first pass their inputs through."""
    position = {rm.region.block.index: k for k, rm in enumerate(plan.regions) if rm.region.kind == "block"}
    io = plan.io
    for a, b in zip(blocks, blocks[1:]):
        ka, kb = position[a], position[b]
        if kb != ka + 1:
            return False
        outs = [io.region_outputs[ka][o] for o, _ in plan.regions[ka].region.streams]
        ins = [io.region_inputs[kb][i] for _, i in plan.regions[kb].region.streams]
        readers = [k for k, names in enumerate(io.region_inputs) if set(outs) & set(names)]
        if outs != ins or readers != [kb] or set(outs) & set(io.output_names):
            return False
    return True


@dataclass
class _ChainReuse:
    reused: bool = False  # this call reuses the back-to-back chain as one, at its first block


@register_policy(StaticCache)
class StaticCachePolicy(_CachePolicy):
    """The paper's accumulate-until-delta schedule, evaluated online on the steps' normalised times."""

    slots = (StateSlot("cache", lambda ctx: _StaticState(acc=[0.0] * len(ctx.plan.structure.blocks)),
                       scope="branch", per_row=True, per_mode=True),)
    requires = {"timestep": TIMESTEP}
    Scratch = _ChainReuse

    def __init__(self, config: StaticCache, plan):
        super().__init__(config, plan)
        cfg = config
        self.schedule: CacheSchedule = cfg.schedule
        self.blocks = sorted(self.cacheable)
        # blocks that recompute together and run back to back are reused as one: x + sum of their values
        self.chain = self.blocks if (not cfg.per_block and cfg.mode == "residual" and len(self.blocks) > 1
                                     and back_to_back(plan, self.blocks)) else []

    def describe(self, steps: int) -> dict:
        """The schedule on ``steps`` uniform steps: which block runs at which step."""
        cfg, blocks = self.config, self.plan.block_names
        times = [1 - k / steps for k in range(steps)]
        scheduled = self.schedule.plan(cfg.delta, times, cfg.per_block, self.blocks)
        grid = [[run or i not in self.cacheable for run in row]  # blocks without cache variants always run
                for i, row in enumerate(scheduled)]
        return {"kind": "static", "delta": cfg.delta, "per_block": cfg.per_block, "forecast": cfg.forecast,
                "steps": steps, "blocks": blocks, "compute": [[int(v) for v in row] for row in grid],
                "block_evals": sum(map(sum, grid)), "block_evals_uncached": len(blocks) * steps}

    def begin_call(self, ctx: CallContext) -> None:
        state = ctx.state(self, "cache")
        u = ctx.info.timestep / self.schedule.time_scale
        compute = self.schedule.advance(state.acc, state.u_prev, u, self.config.delta, self.config.per_block,
                                        self.blocks)
        state.compute = [run or i not in state.cached for i, run in enumerate(compute)]
        state.u_prev = u

    def run_block(self, ctx: CallContext, call: RegionCall, index: int, proceed) -> list:
        if index not in self.cacheable:
            return proceed(call)
        state = ctx.state(self, "cache")
        rm = call.rm
        time = state.u_prev  # this step's normalised time
        if state.compute[index]:
            outs, cached = split_cached(rm, call.run(RESIDUAL))
            entry = state.cached.get(index)
            if entry is None:
                state.cached[index] = CachedValues.first(cached, time, self.config.forecast)
            else:
                entry.update(cached, time)
            state.chain_sum = None
            return outs
        if index in self.chain and not any(state.compute[i] for i in self.chain):
            if index == self.chain[0]:
                state.chain_sum = state.chain_sum or _summed([state.cached[i] for i in self.chain])
                ctx.scratch(self).reused = state.chain_sum is not None  # this call reuses the chain as one
                if state.chain_sum is not None:
                    return call.reuse(reuse_outputs(rm, call.args, state.chain_sum, time, self.config.mode))
            elif ctx.scratch(self).reused:  # already added with the chain's first block
                return call.reuse([call.args[i] for _, i in sorted(rm.region.streams)])
        return call.reuse(reuse_outputs(rm, call.args, state.cached[index], time, self.config.mode))


def _summed(entries: list[CachedValues]) -> CachedValues | None:
    """The entries' values and slopes summed, when they were computed at the same times (None otherwise)."""
    first = entries[0]
    if not all(torch.equal(e.time, first.time) for e in entries[1:]):
        return None
    values = [_sum(vs) for vs in zip(*(e.values for e in entries))]
    slopes = None if first.slopes is None else [_sum(ss) for ss in zip(*(e.slopes for e in entries))]
    return CachedValues(values, first.time, slopes)


def _sum(tensors) -> torch.Tensor:
    total = torch.add(tensors[0], tensors[1])
    for t in tensors[2:]:
        total.add_(t)  # in place: one output buffer, no stacked copy
    return total


@dataclass
class CalibrationRun:
    """One branch of one calibration generation: per step, the change of each block, and the step's time."""

    previous: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: list[list[float]] = field(default_factory=list)  # per step: change of each block
    times: list[float] = field(default_factory=list)


@dataclass
class _Changes:
    """A calibration call's per-block change sums, turned into changes once the call's blocks have run."""

    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _calibration_run(ctx: CallContext) -> CalibrationRun:
    run = CalibrationRun()
    ctx.record(CalibrationPolicy.RECORD, run)
    return run


@register_policy(CacheCalibration)
class CalibrationPolicy(_CachePolicy):
    """Runs every block and records the relative L1 change of each block's cached value per step."""

    RECORD = "cache_calibration"
    slots = (StateSlot("run", _calibration_run, scope="branch", per_mode=True),)
    Scratch = _Changes
    requires = {"timestep": "to record each step's normalised time"}

    def __init__(self, config: CacheCalibration, plan):
        super().__init__(config, plan)
        self.n_blocks = len(plan.structure.blocks)

    def describe(self, steps: int) -> dict:
        return {"kind": "calibration", "description": "every block runs; each block's change is recorded per step"}

    def begin_call(self, ctx: CallContext) -> None:
        run = ctx.state(self, "run")
        run.times.append(ctx.info.timestep)
        run.rows.append([0.0] * self.n_blocks)

    def run_block(self, ctx: CallContext, call: RegionCall, index: int, proceed) -> list:
        if index not in self.cacheable:
            return proceed(call)
        run = ctx.state(self, "run")
        rm = call.rm
        outs, cached = split_cached(rm, call.run(RESIDUAL))
        current = cached[rm.region.primary_stream].detach().float()
        prev = run.previous.get(index)
        if prev is not None:
            ctx.scratch(self).sums[index] = ((current - prev).abs().flatten(1).sum(1), prev.abs().flatten(1).sum(1))
        run.previous[index] = current.detach()
        return outs

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        sums = ctx.scratch(self).sums
        if sums:  # one sum over the context-parallel group for every block of the call
            blocks = sorted(sums)
            totals = ctx.group_sum("the cache calibration's changes", *(s for i in blocks for s in sums[i]))
            row = ctx.state(self, "run").rows[-1]
            for k, index in enumerate(blocks):
                row[index] = float(relative_l1_from_sums(totals[2 * k], totals[2 * k + 1]).mean())
        return outputs
