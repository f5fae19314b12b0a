"""The digits pipeline from the shipped weights: the 50-step teacher, or a shipped (or your own) few-step student
already compiled by ditfx with its history attention."""
from __future__ import annotations

import torch

from ditfx.api import optimize
from ditfx.config import Config
from ditfx.history.config import HistoryAttention

from .pipeline import DigitsStudentPipeline, make_scheduler
from .shipped import load_transformer, teacher_pipeline
from .students import load_student


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
        return teacher_pipeline(scheduler, device, dtype)
    if scheduler != "euler":
        raise ValueError(f"the students were distilled for flow-matching Euler steps; scheduler={scheduler!r} "
                         "is not supported with student=")
    distilled = load_student(student) if isinstance(student, str) else student
    transformer = distilled.model(load_transformer(device=device, dtype=dtype))
    heads = {k: v.to(device=device, dtype=dtype) for k, v in distilled.heads.items()} if distilled.heads else None
    history = HistoryAttention(distilled.layers, distilled.steps, heads=heads)
    pipe = DigitsStudentPipeline(transformer, make_scheduler("euler"), distilled.sigmas)
    return optimize(pipe, Config(history=history, compiler=compiler))
