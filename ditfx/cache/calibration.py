"""Calibration of a static cache schedule (``ditfx.calibrate``): record each block's change per step over a few
uncached generations, through ``ditfx.optimize`` like a user (so it sits above the api)."""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ditfx.api import record_generations
from ditfx.cache.config import CacheCalibration
from ditfx.cache.policy import CalibrationPolicy
from ditfx.cache.schedule import CacheSchedule, block_fingerprint
from ditfx.config import Config


def calibrate(model: nn.Module, run: Callable[[nn.Module], object], generations: int = 4,
              mode: str = "residual", compiler: str = "eager", progress: Callable[[int], None] | None = None
              ) -> CacheSchedule:
    """Record per-block change curves over ``generations`` uncached runs and return a cache schedule.

    ``run(optimized_model)`` must perform one full generation (a sampling loop) with the model it is given.
    """
    runtime = record_generations(model, Config(cache=CacheCalibration(mode), compiler=compiler), run, generations,
                                 progress)
    runs = [r for r in runtime.records.get(CalibrationPolicy.RECORD, []) if r.rows]
    if not runs:
        off = "; ".join(runtime.unavailable("cache"))
        raise RuntimeError(f"calibration recorded nothing: {off}" if off else
                           "calibration recorded nothing: did run() call the model?")
    steps = len(runs[0].times)
    if any(len(s.times) != steps for s in runs):
        raise ValueError("every calibration generation must use the same number of steps (and branches)")
    structure = runtime.executors[0].plan.structure
    n = len(structure.blocks)
    change = [[sum(s.rows[k][i] for s in runs) / len(runs) for k in range(steps)] for i in range(n)]
    time_scale = max(abs(t) for s in runs for t in s.times) or 1.0
    times = [t / time_scale for t in runs[0].times]
    blocks = [b.path for b in structure.blocks]
    try:
        fingerprint = block_fingerprint(model, blocks)
    except ValueError:  # the graph's block paths are not the module's (a wrapper): paths only
        fingerprint = None
    return CacheSchedule(
        blocks=blocks, times=times, change=change, mode=mode, time_scale=time_scale, generations=generations,
        meta={"model": type(model).__name__, "branches": len(runs) // generations}, fingerprint=fingerprint,
    )
