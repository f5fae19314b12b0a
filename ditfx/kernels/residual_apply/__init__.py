"""Cached-residual application: ``x + (r * scale + shift)`` with optional 0-d scalars."""

from .op import residual_apply
from .reference import residual_apply_reference

__all__ = ["residual_apply", "residual_apply_reference"]
