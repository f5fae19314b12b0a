"""Budget calibration: how far the weak mode's prediction is from the native one at each step of a generation.

``run(pipe)`` drives generations as they will be run; every denoiser call is recorded with its native prediction
(:func:`~ditfx.recording.record_calls`) and the weak mode is run on the same inputs. The relative gap
``|weak - native| / |native|`` per step (averaged over calls at the same normalised time) is a
:class:`~ditfx.budget.schedule.BudgetSchedule`: ``TokenBudget(adapter=..., flops=0.6, calibrated=schedule)``
runs weak the steps with the smallest gaps that bring the FLOPs within the budget.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from ditfx.budget.adapter import BudgetAdapter
from ditfx.budget.schedule import BudgetSchedule
from ditfx.budget.training import WeakRunner, capture_sites
from ditfx.recording import first_tensor, record_calls


def calibrate(pipe, run: Callable[[object], object], adapter: BudgetAdapter | None = None,
              patch_size: int | None = None, generations: int = 2, time_scale: float | None = None,
              seed: int = 0, progress: Callable[[str], None] | None = print) -> BudgetSchedule:
    """The weak/native gap per step of ``generations`` generations of ``run(pipe)`` (a new seed each), for
    ``adapter`` (None: the zero-shot mode at ``patch_size``, default twice the native)."""
    denoiser = getattr(pipe, "transformer", pipe)
    scale = time_scale or (adapter.time_scale if adapter is not None else 1000.0)
    say = progress or (lambda _msg: None)
    calls = []
    for g in range(generations):
        torch.manual_seed(seed + 1000 * g)
        calls += record_calls(denoiser, lambda: run(pipe), scale, 1.0)
        say(f"budget calibrate: recorded generation {g + 1}/{generations}")
    if not calls:
        raise ValueError("run(pipe) made no denoiser call")
    runner = WeakRunner(patch_size or 0, 0, "bilinear", adapter)
    if runner.patch == 0:
        runner.patch = 2 * capture_sites(denoiser, calls[0]).patch
    torch._dynamo.reset()
    try:
        weak = torch.compile(denoiser, backend=runner, dynamic=False)
        gaps: dict[float, list[float]] = defaultdict(list)
        with torch.no_grad():
            for call in calls:
                pred = first_tensor(weak(*call.args, **call.kwargs)).float()
                native = call.target.float()
                gaps[round(call.u, 6)].append(float((pred - native).norm() / native.norm().clamp_min(1e-12)))
    finally:
        torch._dynamo.reset()
    times = sorted(gaps, reverse=True)
    ratio = runner.weak_flops / max(1, runner.native_flops)
    say(f"budget calibrate: {len(times)} steps, weak/native FLOPs {ratio:.3f}")
    return BudgetSchedule(times=times, gaps=[sum(gaps[u]) / len(gaps[u]) for u in times], flops_ratio=ratio,
                          patch=runner.patch)
