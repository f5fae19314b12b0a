"""ditfx.tune on the digits pipeline: the run (class-balanced digits per seed), its metric (digits-FD and class
accuracy by the shipped classifier, PSNR and SSIM as docs/digits.md defines them) and the search space (the
shipped cache schedule and token-budget adapter).

    run = digits.TuningRun(guidance_scale=4.0, steps=25)
    budget = ditfx.QualityBudget(psnr=30, fd=0.10, accuracy=0.01, metric=run.metric)
    config = ditfx.tune(digits.pipeline(), run, budget, space=digits.tuning_space(run), calibration=[100],
                        held_out=[200])
"""
from __future__ import annotations

import dataclasses

import torch

from .data import NUM_CLASSES
from .metrics import metrics
from .sampling import class_grid


class TuningRun:
    """One case is one seed: ``per_class`` digits of every class, sampled with ``steps`` Euler steps at
    ``guidance_scale`` from that seed. ``metric(outputs, reference)`` measures outputs of any number of cases."""

    def __init__(self, guidance_scale: float = 1.5, steps: int = 50, per_class: int = 10):
        if per_class < 1 or steps < 1:
            raise ValueError(f"TuningRun needs per_class >= 1 and steps >= 1, got {per_class}, {steps}")
        self.guidance_scale, self.steps, self.per_class = float(guidance_scale), int(steps), int(per_class)
        self.labels = class_grid(per_class)

    def __call__(self, pipe, seed: int) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe(self.labels, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                    generator=torch.Generator().manual_seed(int(seed)), output_type="pt").images

    def metric(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        cases = len(outputs) // (self.per_class * NUM_CLASSES)
        return metrics(outputs.clamp(-1, 1), self.labels.repeat(cases), reference.clamp(-1, 1))

    def __repr__(self) -> str:
        return (f"digits.TuningRun(guidance_scale={self.guidance_scale:g}, steps={self.steps}, "
                f"per_class={self.per_class})")


# docs/benchmarks.md's fastest configuration inside the quality budget (guidance 1.5, 50 steps)
HAND_PICKED = {"delta": 0.7, "gamma": 0.99, "flops": 0.7}


def tuning_space(run: TuningRun | None = None, cache: str | None = "static", guidance: bool = True,
                 budget: bool = True, fades=(1.0, 1.5, 2.0), starts=(HAND_PICKED,)):
    """The standard space on the digits model: the shipped schedule's static cache (or ``cache="dynamic"``, or
    None), Adaptive Guidance when the run guides (its fade a choice among ``fades``: the best one grows with the
    guidance scale, docs/guidance.md; ``guidance=False``: without), and the shipped token-budget adapter
    (``budget=False``: without). The ascent also climbs from ``starts`` (by default the documented hand-picked
    configuration, its knobs that this space has), so the tuned result is never slower than it where it holds."""
    from ditfx.tuning.space import techniques

    from .calibrate import SCHEDULE_FILE, shipped_file
    from .token_budget import budget_adapter

    guided = guidance and (run is None or run.guidance_scale > 1)
    space = techniques(cache=cache, schedule=shipped_file(SCHEDULE_FILE) if cache == "static" else None,
                       guidance=guided, adapter=budget_adapter() if budget else None, fades=fades)
    names = {k.name for k in space.knobs}
    kept = [{k: v for k, v in start.items() if k in names} for start in starts]
    return dataclasses.replace(space, starts=tuple(s for s in kept if s))
