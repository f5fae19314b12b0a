"""Attention masks of ARD's one-shot training forward (shared/research/methods.md 4.1), as small named mask
generators in attention-gym's manner: a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for flex_attention, and the same
mask as a dense boolean matrix for scaled_dot_product_attention.

The training forward concatenates the S steps' token sequences, ``tokens`` tokens each, step 0 first (x_T). In
the lower N layers a query of step s attends to the keys of steps <= s (block-causal: the history), above to its
own step's keys only (block-diagonal: no history, which is plain step distillation).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_causal(tokens: int) -> MaskMod:
    """Step s attends to steps 0..s."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // tokens <= q_idx // tokens

    mask_mod.__name__ = f"block_causal_{tokens}"
    return mask_mod


def block_diagonal(tokens: int) -> MaskMod:
    """Step s attends to its own tokens only."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // tokens == q_idx // tokens

    mask_mod.__name__ = f"block_diagonal_{tokens}"
    return mask_mod


def dense(mask_mod: MaskMod, length: int, device=None) -> torch.Tensor:
    """(length, length) boolean mask (True: attend) of ``mask_mod``, for scaled_dot_product_attention."""
    idx = torch.arange(length, device=device)
    return mask_mod(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), idx[:, None], idx[None, :])


def block_mask(mask_mod: MaskMod, length: int, device="cpu"):
    """flex_attention's BlockMask of ``mask_mod`` over ``length`` queries and keys (any batch and head)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
