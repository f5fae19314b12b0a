"""Registration of ``torch.ops.ditfx.residual_apply`` and its public entry point."""

import torch

from .._common import check_same_shape
from .reference import residual_apply_reference


@torch.library.triton_op("ditfx::residual_apply", mutates_args=())
def _residual_apply_op(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    # Triton cannot trace without a GPU driver, so non-CUDA tensors take the reference.
    if x.device.type != "cuda":
        return residual_apply_reference(x, r, scale, shift)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import residual_apply_launch

    return residual_apply_launch(x, r, scale, shift)


def residual_apply(
    x: torch.Tensor,
    r: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``x + (r * scale + shift)``; without scale and shift, ``x + r``.

    Args:
        x: ``(B, ...)`` input of the skipped block range, float32/float16/bfloat16.
        r: cached residual with x's shape.
        scale: optional 0-d tensor (per-step scalar).
        shift: optional 0-d tensor (per-step scalar).

    Returns:
        x's shape and dtype.
    """
    check_same_shape(x=x, r=r)
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None and v.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(v.shape)}")
    return torch.ops.ditfx.residual_apply.default(x, r, scale, shift)
