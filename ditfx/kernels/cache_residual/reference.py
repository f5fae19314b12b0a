"""Reference block-cache bookkeeping: the block residual and its relative L1 change.

Block caches (FBCache, TeaCache-style) skip a block range when its residual ``out - inp`` has
barely moved since the cached step. One pass computes the new residual and the per-sample change
``sum|residual - cached| / sum|cached|``.
"""

import torch

from ditfx.cache.change import relative_l1_from_sums  # block caching's rule, shared with its policies

from .._common import upcast


def cache_residual_sums_reference(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(out - inp, num, den)``, the semantics of ``torch.ops.ditfx.cache_residual``.

    Args:
        out: ``(B, ...)`` output of the cached block range.
        inp: ``(B, ...)`` its input.
        cached: ``(B, ...)`` the residual cached at an earlier step.

    Returns:
        The residual in out's dtype, and per sample ``num = sum|residual - cached|`` and
        ``den = sum|cached|`` (shape ``(B,)``, float32; float64 for float64 inputs) over all
        non-batch dims, computed from the float32 (not rounded) residual. The sums, not their
        ratio, so a per-batch decision can add them over samples first.
    """
    residual = upcast(out) - upcast(inp)
    cached = upcast(cached)
    num = (residual - cached).abs().flatten(1).sum(1)
    den = cached.abs().flatten(1).sum(1)
    return residual.to(out.dtype), num, den


def cache_residual_reference(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out - inp, change)`` with ``change = num / den`` (float32, ``(B,)``) of
    :func:`cache_residual_sums_reference`; see :func:`relative_l1_from_sums` for ``den == 0``."""
    residual, num, den = cache_residual_sums_reference(out, inp, cached)
    return residual, relative_l1_from_sums(num, den)
