"""Reference AdaLN modulation: LayerNorm without affine, then ``y * (1 + scale) + shift``.

This is the ``modulate(norm(x), shift, scale)`` step of every DiT block (Peebles & Xie, 2023,
``facebookresearch/DiT:models.py``). The reference defines the op's semantics; the Triton kernel
must match it.
"""

import torch
import torch.nn.functional as F

from .._common import modulation_view, upcast


def adaln_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in float32 (or float64), returned in x's dtype.

    Args:
        x: ``(B, T, D)`` activations.
        shift: per-sample ``(B, D)`` / ``(B, 1, D)`` or per-token ``(B, T, D)``.
        scale: same kinds as ``shift``.
        eps: LayerNorm epsilon (DiT uses 1e-6).
    """
    xf = upcast(x)
    y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    scale = modulation_view(upcast(scale), x.shape)
    shift = modulation_view(upcast(shift), x.shape)
    return (y * (1 + scale) + shift).to(x.dtype)
