"""What the pass manager hands every pass besides the plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditfx.config import Config
from ditfx.passes.fusion import FusionReport


@dataclass
class PassContext:
    config: Config
    fusion: FusionReport | None = None  # set when kernels are on: later passes lower their own variants too
    example_inputs: list | None = None  # the captured call's inputs (weights included), where the caller has them
    facts: Any = None  # the ModelFacts of the model
