"""Block caching at run time: per-step policies (dynamic, static, calibration) and their per-branch state.

Each policy decides, block by block, whether a block runs or reuses what it cached; state lives per
generation and per branch (the calls of one step), and per sample inside a batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ditfx.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.graph.regions import RegionModule
from ditfx.runtime.schedule import CacheSchedule
from ditfx.runtime.steps import StepInfo

RunVariant = Callable[[str, list], tuple]  # (variant name, args) -> region outputs


def split_cached(rm: RegionModule, outs: tuple) -> tuple[list, list]:
    """Split a residual variant's outputs into the block outputs and the cached values (one per stream)."""
    n = len(rm.region.outputs)
    return list(outs[:n]), list(outs[n:n + len(rm.region.streams)])


def reuse_outputs(rm: RegionModule, args: list, cached: list, mode: str) -> list:
    """A skipped block's outputs: its current stream inputs plus the cached residuals (or the cached outputs)."""
    outs: list = [None] * len(rm.region.outputs)
    for (o, i), c in zip(rm.region.streams, cached):
        outs[o] = args[i] + c if mode == "residual" else c
    return outs


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def relative_l1(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 = 0 and x/0 = inf: no reference change means no change only if nothing changed."""
    ratio = num / den
    return torch.where(den == 0, torch.where(num == 0, 0.0, float("inf")), ratio)


@dataclass
class _DynamicState:
    ref: torch.Tensor | None = None  # probe's cached value at the last computed step, per sample
    cached: dict[int, list] = field(default_factory=dict)
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
        if state.skip_all:
            return reuse_outputs(rm, args, state.cached[index], self.cfg.mode), False
        outs, cached = split_cached(rm, run("residual", args))
        if state.skip_any:  # mixed batch: every sample keeps its own decision
            old = state.cached[index]
            reused = reuse_outputs(rm, args, old, self.cfg.mode)
            for (o, _), s in zip(rm.region.streams, range(len(cached))):
                outs[o] = torch.where(_per_sample(state.skip, outs[o]), reused[o], outs[o])
                cached[s] = torch.where(_per_sample(state.skip, cached[s]), old[s], cached[s])
        state.cached[index] = cached
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
        change = relative_l1(num, den) if self.cfg.per_sample else relative_l1(num.sum(), den.sum()).expand_as(num)
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
    cached: dict[int, list] = field(default_factory=dict)


class StaticCachePolicy:
    """The paper's accumulate-until-delta schedule, evaluated online on the steps' normalised times."""

    def __init__(self, cfg: StaticCache, n_blocks: int, cacheable: set[int]):
        self.cfg = cfg
        self.schedule: CacheSchedule = cfg.schedule
        self.n_blocks = n_blocks
        self.cacheable = cacheable

    def new_state(self) -> _StaticState:
        return _StaticState(acc=[0.0] * self.n_blocks)

    def begin_call(self, state: _StaticState, step: StepInfo) -> None:
        if step.timestep is None:
            raise RuntimeError("StaticCache needs the denoiser's timestep input to key its schedule, and this "
                               "graph has none that ditfx recognises; use DynamicCache")
        u = step.timestep / self.schedule.time_scale
        first = state.u_prev is None
        state.compute = []
        for i in range(self.n_blocks):
            if not first:
                state.acc[i] += self.schedule.increment(i, state.u_prev, u)
            run = first or self.cfg.delta == 0 or state.acc[i] > self.cfg.delta or i not in state.cached
            if run:
                state.acc[i] = 0.0
            state.compute.append(run)
        state.u_prev = u

    def run_block(self, state: _StaticState, step: StepInfo, index: int, rm: RegionModule, args: list,
                  run: RunVariant) -> tuple[list, bool]:
        if index not in self.cacheable:
            return list(run("base", args)), True
        if state.compute[index]:
            outs, state.cached[index] = split_cached(rm, run("residual", args))
            return outs, True
        return reuse_outputs(rm, args, state.cached[index], self.cfg.mode), False


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
            state.rows[-1][index] = float(relative_l1(num, den).mean())
        state.previous[index] = current
        return outs, True


def make_policy(cfg, n_blocks: int, cacheable: set[int]):
    kinds = {DynamicCache: DynamicCachePolicy, StaticCache: StaticCachePolicy, CacheCalibration: CalibrationPolicy}
    return kinds[type(cfg)](cfg, n_blocks, cacheable)
