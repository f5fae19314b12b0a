"""Reference gated residual: ``x + gate * y``.

DiT adds each sub-layer's output back through an adaLN-Zero gate
(``x = x + gate_msa.unsqueeze(1) * attn(...)``, ``facebookresearch/DiT:models.py``).
"""

import torch

from .._common import modulation_view, upcast


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``, computed in float32 (or float64), returned in x's dtype.

    Args:
        x: ``(B, T, D)`` residual stream.
        gate: per-sample ``(B, D)`` / ``(B, 1, D)`` or per-token ``(B, T, D)``.
        y: ``(B, T, D)`` sub-layer output.
    """
    gate = modulation_view(upcast(gate), x.shape)
    return (upcast(x) + gate * upcast(y)).to(x.dtype)
