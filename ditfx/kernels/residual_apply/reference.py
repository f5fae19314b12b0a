"""Reference cached-residual application: ``x + (r * scale + shift)``.

When a block cache skips a block range it adds the cached residual ``r`` back to the range's
input. Optional per-step scalars rescale it (for example to extrapolate the residual between
refreshes); they are 0-d tensors so a changing value does not recompile a graph.
"""

import torch

from .._common import upcast


def residual_apply_reference(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + (r * scale + shift)``, computed in float32 (or float64), returned in x's dtype.

    Args:
        x: ``(B, ...)`` input of the skipped block range.
        r: residual with x's shape.
        scale: optional 0-d tensor; omitted means 1.
        shift: optional 0-d tensor; omitted means 0.
    """
    r = upcast(r)
    if scale is not None:
        r = r * upcast(scale)
    if shift is not None:
        r = r + upcast(shift)
    return (upcast(x) + r).to(x.dtype)
