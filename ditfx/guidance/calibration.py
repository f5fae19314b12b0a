"""Calibration of guidance skipping (``ditfx.calibrate_guidance``: LinearAG's coefficients from full-guidance
trajectories) and Adaptive Guidance's trace (``ditfx.guidance_trace``), through ``ditfx.optimize`` like a user
(so it sits above the api)."""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

import ditfx.guidance.linear_ag as linear_ag
from ditfx.api import record_generations, runtime_of
from ditfx.config import Config
from ditfx.guidance.config import GuidanceRecording
from ditfx.guidance.policy import RECORDING, TRACE


def calibrate_guidance(model: nn.Module, run: Callable[[nn.Module], object], generations: int = 4,
                       uncond_first: bool | None = None, compiler: str = "eager",
                       progress: Callable[[int], None] | None = None) -> linear_ag.LinearAGCoefficients:
    """Record full-guidance trajectories over ``generations`` runs and fit LinearAG's per-step coefficients.

    ``run(optimized_model)`` performs one generation with classifier-free guidance (batched or two calls per
    step); every generation must use the same step grid, which the coefficients are then valid for.
    """
    runtime = record_generations(model, Config(guidance=GuidanceRecording(uncond_first), compiler=compiler), run,
                                 generations, progress, what="calibrate_guidance")
    recorded = [s for s in runtime.records.get(RECORDING, []) if s.cond_history]
    if not recorded:
        off = "; ".join(runtime.unavailable("guidance"))
        raise RuntimeError(f"no classifier-free guidance was recorded: {off}" if off else
                           "no classifier-free guidance was recorded: does run() sample with guidance > 1?")
    steps = len(recorded[0].cond_history)
    if any(len(s.cond_history) != steps for s in recorded):
        raise ValueError("every calibration generation must use the same number of steps")
    coefficients = linear_ag.fit([s.cond_history for s in recorded], [s.uncond_history for s in recorded],
                                 recorded[0].times)
    coefficients.meta.update(model=type(model).__name__, generations=generations)
    return coefficients


def guidance_trace(optimized) -> list[list[float]]:
    """Adaptive Guidance's per-step, per-sample cosine of the last generation (NaN where not measured)."""
    traces = runtime_of(optimized).records.get(TRACE)
    if not traces:
        raise ValueError("no guidance state: optimize with ditfx.AdaptiveGuidance and run a generation first")
    return traces[-1]
