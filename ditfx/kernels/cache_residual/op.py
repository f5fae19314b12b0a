"""Registration of ``torch.ops.ditfx.cache_residual`` and its public entry points."""

import torch

from .._common import check_same_shape
from .reference import cache_residual_sums_reference, relative_l1_from_sums


@torch.library.triton_op("ditfx::cache_residual", mutates_args=())
def _cache_residual_op(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Triton cannot trace without a GPU driver, so non-CUDA tensors take the reference.
    if out.device.type != "cuda":
        return cache_residual_sums_reference(out, inp, cached)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import cache_residual_launch

    return cache_residual_launch(out, inp, cached)


def cache_residual_sums(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``residual = out - inp`` with the L1 sums of the change, ``(residual, num, den)``.

    ``num = sum|residual - cached|`` and ``den = sum|cached|`` per sample, ``(B,)`` float32: the op
    itself, which the fusion pass lowers the block-cache bookkeeping to (the runtime adds the sums
    over samples for a per-batch decision before dividing).
    """
    check_same_shape(out=out, inp=inp, cached=cached)
    return torch.ops.ditfx.cache_residual.default(out, inp, cached)


def cache_residual(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual = out - inp`` and ``change = sum|residual - cached| / sum|cached|``.

    Args:
        out: ``(B, ...)`` output of the cached block range, float32/float16/bfloat16.
        inp: ``(B, ...)`` its input.
        cached: ``(B, ...)`` the residual cached at an earlier step.

    Returns:
        ``(residual, change)``: the residual in out's dtype and ``change`` ``(B,)`` float32.
        ``change`` is ``+inf`` where ``sum|cached| == 0`` unless the numerator is 0 too (then 0).
    """
    residual, num, den = cache_residual_sums(out, inp, cached)
    return residual, relative_l1_from_sums(num, den)
