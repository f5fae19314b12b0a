"""An embedded, really trained class-conditional DiT on 16x16 digits, with its own quality metrics.

The model is a stock diffusers ``DiTTransformer2DModel`` (6 blocks, width 128, patch 2, about 2.1M
parameters) trained here with rectified flow on scikit-learn's bundled digits, so diffusers' cache
hooks and ditfx's passes can be judged on a real model without downloading anything. See
docs/digits.md.

    from ditfx.models import digits
    pipe = digits.pipeline()                      # FlowMatchEulerDiscreteScheduler
    images = pipe([0, 1, 2], guidance_scale=3.0).images   # (3, 1, 16, 16) in [-1, 1]
    digits.metrics(images, [0, 1, 2])             # {'fd': ..., 'accuracy': ...}
"""

from __future__ import annotations

import torch

from .budget import budget_adapter
from .metrics import metrics
from .model import NULL_CLASS
from .pipeline import DigitsPipeline, make_scheduler
from .shipped import WEIGHTS_DIR, load_classifier, load_transformer

__all__ = [
    "NULL_CLASS",
    "WEIGHTS_DIR",
    "budget_adapter",
    "DigitsPipeline",
    "load_classifier",
    "load_transformer",
    "make_scheduler",
    "metrics",
    "pipeline",
]


def pipeline(
    scheduler: str = "euler", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The digits pipeline from the shipped weights, with the "euler" or "dpm" scheduler."""
    transformer = load_transformer(device=device, dtype=dtype)
    return DigitsPipeline(transformer=transformer, scheduler=make_scheduler(scheduler))
