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

from .build import pipeline
from .metrics import metrics
from .model import NULL_CLASS
from .pipeline import DigitsPipeline, DigitsStudentPipeline, make_scheduler
from .shipped import WEIGHTS_DIR, load_classifier, load_transformer
from .students import STUDENTS, load_student
from .token_budget import budget_adapter
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
