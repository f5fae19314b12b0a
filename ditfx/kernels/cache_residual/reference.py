"""Reference block-cache bookkeeping: the block residual and its relative L1 change.

Block caches (FBCache, TeaCache-style) skip a block range when its residual ``out - inp`` has
barely moved since the cached step. One pass computes the new residual and the per-sample change
``sum|residual - cached| / sum|cached|``.
"""

import torch

from .._common import upcast


def relative_l1_from_sums(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` per sample, with the zero-denominator rule.

    When ``den == 0`` (the cached residual is all zeros) the relative change is undefined: return
    ``+inf`` (always "changed", so the cache is refreshed) unless ``num`` is also 0, in which case
    nothing changed and the result is 0. Shared with the Triton path so both follow one rule.
    """
    zero_den = torch.where(num > 0, torch.inf, 0.0)
    return torch.where(den > 0, num / den, zero_den).to(torch.float32)


def cache_residual_reference(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out - inp, change)``.

    Args:
        out: ``(B, ...)`` output of the cached block range.
        inp: ``(B, ...)`` its input.
        cached: ``(B, ...)`` the residual cached at an earlier step.

    Returns:
        The residual in out's dtype, and ``change`` of shape ``(B,)`` float32:
        ``sum|residual - cached| / sum|cached|`` over all non-batch dims, computed from the
        float32 (not rounded) residual; see :func:`relative_l1_from_sums` for ``sum|cached| == 0``.
    """
    residual = upcast(out) - upcast(inp)
    cached = upcast(cached)
    num = (residual - cached).abs().flatten(1).sum(1)
    den = cached.abs().flatten(1).sum(1)
    return residual.to(out.dtype), relative_l1_from_sums(num, den)
