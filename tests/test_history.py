"""History attention (ARD), started: the training forward's masks and the history's FLOPs."""
import pytest
import torch
import torch.nn.functional as F

from ditfx.history import block_causal, block_diagonal, block_mask, dense, history_flops


def test_the_history_costs_the_papers_1_1_percent_at_dit_xl2_shapes():
    cost = history_flops(steps=4, tokens=256, width=1152, depth=28, history_layers=6)
    assert round(100 * cost.ratio, 3) == 1.148
    assert history_flops(4, 256, 1152, 28, 0).extra == 0
    with pytest.raises(ValueError, match="history_layers"):
        history_flops(4, 256, 1152, 28, 29)


def test_the_masks_are_block_causal_and_block_diagonal():
    causal, diagonal = dense(block_causal(2), 6), dense(block_diagonal(2), 6)
    steps = torch.arange(6) // 2
    assert torch.equal(causal, steps[None, :] <= steps[:, None])
    assert torch.equal(diagonal, steps[None, :] == steps[:, None])


@pytest.mark.parametrize("mask", [block_causal, block_diagonal])
def test_flex_attention_with_the_block_mask_is_sdpa_with_the_dense_mask(mask):
    from torch.nn.attention.flex_attention import flex_attention

    tokens, steps = 16, 4
    n = tokens * steps
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=block_mask(mask(tokens), n))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense(mask(tokens), n))
    assert (got - expected).abs().max() <= 1e-10
