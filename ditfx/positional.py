"""The fixed sin-cos embeddings of positions and timesteps (DiT's): shared by the reference DiT and the token
budget's coarse positional tables, which evaluate them at other positions."""
from __future__ import annotations

import torch
from torch import Tensor

MAX_PERIOD = 10000  # the longest wavelength of the sin-cos frequencies


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(P,) positions -> (P, dim) ``[sin(p * w_k), cos(p * w_k)]``, w_k = 10000^(-2k/dim)."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
