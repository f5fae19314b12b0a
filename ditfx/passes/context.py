"""What the pass manager hands every pass besides the plan."""
from __future__ import annotations

from dataclasses import dataclass

from ditfx.config import Config
from ditfx.passes.fusion import FusionReport


@dataclass
class PassContext:
    config: Config
    fusion: FusionReport | None = None  # set when kernels are on: later passes lower their own variants too
