"""Sampling helpers shared by the demo, the calibration and the benchmarks: class grids and one generation."""

from __future__ import annotations

import torch

from .data import NUM_CLASSES
from .pipeline import DigitsPipeline, make_scheduler


def class_grid(per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: ``per_class`` samples of every digit."""
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def generate(transformer, labels, steps: int, guidance_scale: float, seed: int, scheduler: str = "euler",
             progress: dict | None = None) -> torch.Tensor:
    """One generation with ``transformer`` (plain or compiled) in a fresh DigitsPipeline: (N, 1, 16, 16)."""
    pipe = DigitsPipeline(transformer=transformer, scheduler=make_scheduler(scheduler))
    pipe.set_progress_bar_config(**(progress or {"disable": True}))
    return pipe(labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images
