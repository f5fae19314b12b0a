"""Gated residual: ``x + gate * y`` with a per-sample or per-token gate."""

from .op import gated_residual
from .reference import gated_residual_reference

__all__ = ["gated_residual", "gated_residual_reference"]
