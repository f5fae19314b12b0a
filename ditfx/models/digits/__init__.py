"""An embedded, really trained class-conditional DiT on 16x16 digits, with its own quality metrics.

The model is a stock diffusers ``DiTTransformer2DModel`` (6 blocks, width 128, patch 2, about 2.1M
parameters) trained here with rectified flow on scikit-learn's bundled digits, so diffusers' cache
hooks and ditfx's passes can be judged on a real model without downloading anything. See
docs/digits.md.

    from ditfx.models import digits
    pipe = digits.pipeline()                      # FlowMatchEulerDiscreteScheduler
    images = pipe([0, 1, 2], guidance_scale=3.0).images   # (3, 1, 16, 16) in [-1, 1]
    digits.metrics(images, [0, 1, 2])             # {'fd': ..., 'accuracy': ...}
    student = digits.pipeline(student="ard")      # the 4-step ARD student, no guidance (docs/history.md)
"""

from __future__ import annotations

import torch

from .budget import budget_adapter
from .metrics import metrics
from .model import NULL_CLASS
from .pipeline import DigitsPipeline, DigitsStudentPipeline, make_scheduler
from .shipped import WEIGHTS_DIR, load_classifier, load_transformer
from .students import STUDENTS, load_student
from .tuning import TuningRun, tuning_space

__all__ = [
    "NULL_CLASS",
    "WEIGHTS_DIR",
    "budget_adapter",
    "DigitsPipeline",
    "DigitsStudentPipeline",
    "STUDENTS",
    "TuningRun",
    "load_student",
    "load_classifier",
    "load_transformer",
    "make_scheduler",
    "metrics",
    "pipeline",
    "tuning_space",
]


def pipeline(
    scheduler: str = "euler", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    student=None, compiler: str = "inductor",
):
    """The digits pipeline from the shipped weights, with the "euler" or "dpm" scheduler.

    ``student="ard"`` or ``"step"``: the shipped 4-step student instead (history attention in the lower 2 blocks,
    or none; or a :class:`~ditfx.history.HistoryStudent` of your own), a :class:`DigitsStudentPipeline` that
    samples without guidance, already compiled by ditfx with the student's ``HistoryAttention`` (and its step
    heads) with ``compiler``."""
    if student is None:
        transformer = load_transformer(device=device, dtype=dtype)
        return DigitsPipeline(transformer=transformer, scheduler=make_scheduler(scheduler))
    import ditfx

    if scheduler != "euler":
        raise ValueError(f"the students were distilled for flow-matching Euler steps; scheduler={scheduler!r} "
                         "is not supported with student=")
    distilled = load_student(student) if isinstance(student, str) else student
    transformer = distilled.model(load_transformer(device=device, dtype=dtype))
    heads = {k: v.to(device=device, dtype=dtype) for k, v in distilled.heads.items()} if distilled.heads else None
    history = ditfx.HistoryAttention(distilled.layers, distilled.steps, heads=heads)
    pipe = DigitsStudentPipeline(transformer, make_scheduler("euler"), distilled.sigmas)
    return ditfx.optimize(pipe, ditfx.Config(history=history, compiler=compiler))
