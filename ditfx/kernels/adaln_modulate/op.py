"""Registration of ``torch.ops.ditfx.adaln_modulate`` and its public entry point."""

import torch

from .._common import check_modulation
from .reference import adaln_modulate_reference


@torch.library.triton_op("ditfx::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    # Triton cannot trace without a GPU driver ("0 active drivers"), so non-CUDA tensors (and
    # fake tensors on CPU) take the reference; this keeps compile and export working on CPU.
    if x.device.type != "cuda":
        return adaln_modulate_reference(x, shift, scale, eps)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import adaln_modulate_launch

    return adaln_modulate_launch(x, shift, scale, eps)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Fused ``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm over D, no affine).

    Args:
        x: ``(B, T, D)`` activations, float32/float16/bfloat16.
        shift: per-sample ``(B, D)`` (or ``(B, 1, D)``) or per-token ``(B, T, D)``.
        scale: same kinds as ``shift``.
        eps: LayerNorm epsilon.

    Returns:
        ``(B, T, D)`` in x's dtype.
    """
    check_modulation("shift", shift, x)
    check_modulation("scale", scale, x)
    return torch.ops.ditfx.adaln_modulate.default(x, shift, scale, eps)
