"""The block caches' change rule, ``num / den`` per sample, in one place for the cache policies and the
``cache_residual`` kernel.

Kept outside :mod:`ditfx.kernels`: importing that package registers the Triton ops, which imports Inductor, and
the cache policies (also run from a loaded package) need only this rule. ``ditfx.kernels.cache_residual``
re-exports it.
"""
from __future__ import annotations

import torch


def relative_l1_from_sums(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` per sample, with the zero-denominator rule.

    When ``den == 0`` (the cached residual is all zeros) the relative change is undefined: return
    ``+inf`` (always "changed", so the cache is refreshed) unless ``num`` is also 0, in which case
    nothing changed and the result is 0. A NaN in either sum (a NaN in the sample) is ``+inf`` too: never read
    as "unchanged". Shared with the Triton path so both follow one rule.
    """
    zero_den = torch.where(num > 0, torch.inf, 0.0)
    change = torch.where(den > 0, num / den, zero_den)
    return torch.where(num.isnan() | den.isnan(), torch.inf, change).to(torch.float32)
