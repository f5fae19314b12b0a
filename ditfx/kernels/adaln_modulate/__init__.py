"""AdaLN modulation: ``LayerNorm(x) * (1 + scale) + shift`` in one pass over x."""

from .op import adaln_modulate
from .reference import adaln_modulate_reference

__all__ = ["adaln_modulate", "adaln_modulate_reference"]
