"""Registration of ``torch.ops.ditfx.gated_residual`` and its public entry point."""

import torch

from .._common import check_modulation, check_same_shape
from .reference import gated_residual_reference


@torch.library.triton_op("ditfx::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Triton cannot trace without a GPU driver, so non-CUDA tensors take the reference.
    if x.device.type != "cuda":
        return gated_residual_reference(x, gate, y)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import gated_residual_launch

    return gated_residual_launch(x, gate, y)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fused ``x + gate * y``.

    Args:
        x: ``(B, T, D)`` residual stream, float32/float16/bfloat16.
        gate: per-sample ``(B, D)`` (or ``(B, 1, D)``) or per-token ``(B, T, D)``.
        y: ``(B, T, D)`` sub-layer output.

    Returns:
        ``(B, T, D)`` in x's dtype.
    """
    check_same_shape(x=x, y=y)
    check_modulation("gate", gate, x)
    return torch.ops.ditfx.gated_residual.default(x, gate, y)
