"""Block caching at run time: per-step policies (dynamic, static, calibration) and their per-branch state.

Each policy decides, block by block, whether a block runs or reuses what it cached; state lives per
generation and per branch (the calls of one step), and per sample inside a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ditfx.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.graph.regions import RegionModule
from ditfx.kernels.cache_residual.reference import relative_l1_from_sums
from ditfx.runtime.schedule import CacheSchedule
from ditfx.runtime.steps import StepInfo

class RunVariant(Protocol):
    """How a policy runs a block region: a variant on all of the call's rows, or on some of them."""

    def __call__(self, variant: str, args: list) -> tuple:
        """The variant's outputs on every row."""

    def on_rows(self, variant: str, args: list, ids: torch.Tensor) -> tuple | None:
        """The variant's outputs for rows ``ids`` only (in that order), or None when it cannot run on a subset
        (then the policy runs every row)."""


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
            self.slopes = [_where(computed, (new - old) * _per_sample(inv.to(new.dtype), new), s)
                           for new, old, s in zip(values, self.values, self.slopes)]
        self.values = [_where(computed, new, old) for new, old in zip(values, self.values)]
        self.time = _where(computed, torch.full_like(self.time, float(time)), self.time)

    def at(self, time: float) -> list[torch.Tensor]:
        """The values forecast for ``time``: as cached, or extrapolated along the slopes."""
        if self.slopes is None:
            return self.values
        dt = time - self.time
        return [torch.addcmul(v, _per_sample(dt.to(v.dtype), v), s) for v, s in zip(self.values, self.slopes)]


def _where(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new if mask is None else torch.where(_per_sample(mask, new), new, old)


def step_time(step: StepInfo) -> float:
    """The time a forecast extrapolates along: the denoiser's timestep, or the step index without one."""
    return float(step.step) if step.timestep is None else step.timestep


def reuse_outputs(rm: RegionModule, args: list, cached: list, mode: str) -> list:
    """A skipped block's outputs: its current stream inputs plus the cached residuals (or the cached outputs)."""
    outs: list = [None] * len(rm.region.outputs)
    for (o, i), c in zip(rm.region.streams, cached):
        outs[o] = args[i] + c if mode == "residual" else c
    return outs


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _DynamicState:
    ref: torch.Tensor | None = None  # probe's cached value at the last computed step, per sample
    cached: dict[int, CachedValues] = field(default_factory=dict)
    reuse: torch.Tensor | None = None  # consecutive reuses per sample
    skip: torch.Tensor | None = None  # this call's decision per sample
    skip_all: bool = False
    skip_any: bool = False


class DynamicCachePolicy:
    """First-block-cache style: block ``first-1``'s change decides whether the middle blocks run."""

    def __init__(self, cfg: DynamicCache, n_blocks: int, cacheable: set[int]):
        self.cfg = cfg
        self.probe = cfg.first - 1
        self.middle = {i for i in range(cfg.first, n_blocks - cfg.last) if i in cacheable}

    def new_state(self) -> _DynamicState:
        return _DynamicState()

    def begin_call(self, state: _DynamicState, step: StepInfo) -> None:
        state.skip, state.skip_all, state.skip_any = None, False, False

    def run_block(self, state: _DynamicState, step: StepInfo, index: int, rm: RegionModule, args: list,
                  run: RunVariant) -> tuple[list, bool]:
        if index == self.probe:
            return self._run_probe(state, step, rm, args, run), True
        if index not in self.middle:
            return list(run("base", args)), True
        time = step_time(step)
        if state.skip_all:
            return reuse_outputs(rm, args, state.cached[index].at(time), self.cfg.mode), False
        entry = state.cached.get(index)
        if entry is not None and state.skip_any:  # mixed batch: every sample keeps its own decision
            computing = ~state.skip
            reused = reuse_outputs(rm, args, entry.at(time), self.cfg.mode)
            ids = computing.nonzero().flatten()
            part = run.on_rows("residual", args, ids)
            if part is not None:  # only the computing rows ran: scatter them over the reused ones
                outs, cached = split_cached(rm, part)
                outs = [r.index_copy(0, ids, o) for r, o in zip(reused, outs)]
                cached = [v.index_copy(0, ids, c) for v, c in zip(entry.values, cached)]
            else:
                outs, cached = split_cached(rm, run("residual", args))
                for o, _ in rm.region.streams:
                    outs[o] = torch.where(_per_sample(state.skip, outs[o]), reused[o], outs[o])
            entry.update(cached, time, computing)
            return outs, True
        outs, cached = split_cached(rm, run("residual", args))
        if entry is None:
            state.cached[index] = CachedValues.first(cached, time, self.cfg.forecast)
        else:
            entry.update(cached, time)
        return outs, True

    def _run_probe(self, state: _DynamicState, step: StepInfo, rm: RegionModule, args: list, run: RunVariant):
        primary = rm.region.primary_stream
        if state.ref is None:
            outs, cached = split_cached(rm, run("residual", args))
            state.ref = cached[primary]
            return outs
        result = run("probe", [*args, state.ref])
        outs, cached = split_cached(rm, result[:-2])
        num, den = result[-2], result[-1]
        if self.cfg.per_sample:
            change = relative_l1_from_sums(num, den)
        else:  # one decision for the batch: the change of all samples together
            change = relative_l1_from_sums(num.sum(), den.sum()).expand_as(num)
        skip = change < self.cfg.threshold
        if state.reuse is None:
            state.reuse = torch.zeros_like(num, dtype=torch.int64)
        if self.cfg.max_reuse is not None:
            skip &= state.reuse < self.cfg.max_reuse
        ready = step.step >= self.cfg.warmup and all(i in state.cached for i in self.middle)
        skip &= ready
        decided = skip.tolist()  # the one host sync of the step
        state.skip, state.skip_all, state.skip_any = skip, all(decided), any(decided)
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


class StaticCachePolicy:
    """The paper's accumulate-until-delta schedule, evaluated online on the steps' normalised times."""

    def __init__(self, cfg: StaticCache, n_blocks: int, cacheable: set[int]):
        self.cfg = cfg
        self.schedule: CacheSchedule = cfg.schedule
        self.n_blocks = n_blocks
        self.cacheable = cacheable
        self.blocks = sorted(cacheable)

    def new_state(self) -> _StaticState:
        return _StaticState(acc=[0.0] * self.n_blocks)

    def begin_call(self, state: _StaticState, step: StepInfo) -> None:
        if step.timestep is None:
            raise RuntimeError("StaticCache needs the denoiser's timestep input to key its schedule, and this "
                               "graph has none that ditfx recognises; use DynamicCache")
        u = step.timestep / self.schedule.time_scale
        compute = self.schedule.advance(state.acc, state.u_prev, u, self.cfg.delta, self.cfg.per_block,
                                        self.blocks)
        state.compute = [run or i not in state.cached for i, run in enumerate(compute)]
        state.u_prev = u

    def run_block(self, state: _StaticState, step: StepInfo, index: int, rm: RegionModule, args: list,
                  run: RunVariant) -> tuple[list, bool]:
        if index not in self.cacheable:
            return list(run("base", args)), True
        time = state.u_prev  # this step's normalised time
        if state.compute[index]:
            outs, cached = split_cached(rm, run("residual", args))
            entry = state.cached.get(index)
            if entry is None:
                state.cached[index] = CachedValues.first(cached, time, self.cfg.forecast)
            else:
                entry.update(cached, time)
            return outs, True
        return reuse_outputs(rm, args, state.cached[index].at(time), self.cfg.mode), False


@dataclass
class _CalibrationState:
    previous: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: list[list[float]] = field(default_factory=list)  # per step: change of each block
    times: list[float] = field(default_factory=list)


class CalibrationPolicy:
    """Runs every block and records the relative L1 change of each block's cached value per step."""

    def __init__(self, cfg: CacheCalibration, n_blocks: int, cacheable: set[int]):
        self.cfg = cfg
        self.n_blocks = n_blocks
        self.cacheable = cacheable
        self.finished: list[_CalibrationState] = []

    def new_state(self) -> _CalibrationState:
        state = _CalibrationState()
        self.finished.append(state)
        return state

    def begin_call(self, state: _CalibrationState, step: StepInfo) -> None:
        if step.timestep is None:
            raise RuntimeError("calibration needs the denoiser's timestep input, and this graph has none that "
                               "ditfx recognises")
        state.times.append(step.timestep)
        state.rows.append([0.0] * self.n_blocks)

    def run_block(self, state: _CalibrationState, step: StepInfo, index: int, rm: RegionModule, args: list,
                  run: RunVariant) -> tuple[list, bool]:
        if index not in self.cacheable:
            return list(run("base", args)), True
        outs, cached = split_cached(rm, run("residual", args))
        current = cached[rm.region.primary_stream].detach().float()
        prev = state.previous.get(index)
        if prev is not None:
            num = (current - prev).abs().flatten(1).sum(1)
            den = prev.abs().flatten(1).sum(1)
            state.rows[-1][index] = float(relative_l1_from_sums(num, den).mean())
        state.previous[index] = current
        return outs, True


def make_policy(cfg, n_blocks: int, cacheable: set[int]):
    kinds = {DynamicCache: DynamicCachePolicy, StaticCache: StaticCachePolicy, CacheCalibration: CalibrationPolicy}
    return kinds[type(cfg)](cfg, n_blocks, cacheable)
