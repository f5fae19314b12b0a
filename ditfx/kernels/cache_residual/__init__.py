"""Block-cache residual: ``out - inp`` and its relative L1 change against a cached residual."""

from .op import cache_residual, cache_residual_sums
from .reference import cache_residual_reference, cache_residual_sums_reference

__all__ = ["cache_residual", "cache_residual_reference", "cache_residual_sums", "cache_residual_sums_reference"]
