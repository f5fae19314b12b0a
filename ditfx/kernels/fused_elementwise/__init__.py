"""Fused elementwise expressions (optionally after a LayerNorm) in one generated Triton kernel.

The op the fusion pass (``ditfx.kernels.lowering.fusion``) lowers pattern variants to when no fixed kernel
(``adaln_modulate``, ``gated_residual``) has their exact form.
"""

from .op import fused_elementwise
from .reference import fused_elementwise_reference

__all__ = ["fused_elementwise", "fused_elementwise_reference"]
