"""The epilogue variant that returns Adaptive Guidance's sums next to the prediction."""
import torch
import torch.fx as fx

from ditfx.guidance.policy import cosine_from_sums
from ditfx.guidance.variants import cosine_sums_variant


def epilogue(x, w):
    return x @ w, x.sum()


def test_variant_returns_the_outputs_and_the_pair_sums():
    gm = fx.symbolic_trace(epilogue)
    variant = cosine_sums_variant(gm, pred_index=0)
    x, w = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    uncond, cond = torch.tensor([0, 2]), torch.tensor([3, 5])
    *outs, dot, uu, cc = variant(x, w, uncond, cond)
    pred = x @ w
    torch.testing.assert_close(outs, [pred, x.sum()])
    u, c = pred[uncond], pred[cond]
    torch.testing.assert_close(dot, (u * c).sum(1))
    torch.testing.assert_close(uu, (u * u).sum(1))
    torch.testing.assert_close(cc, (c * c).sum(1))
    torch.testing.assert_close(cosine_from_sums(dot, uu, cc), torch.cosine_similarity(c, u, dim=1))
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["x", "w"]  # the original is untouched


def test_sums_are_float64_for_low_precision_predictions():
    variant = cosine_sums_variant(fx.symbolic_trace(epilogue), pred_index=0)
    x, w = torch.randn(4, 5).half(), torch.randn(5, 3).half()
    *_, dot, uu, cc = variant(x, w, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert dot.dtype == uu.dtype == cc.dtype == torch.float64
