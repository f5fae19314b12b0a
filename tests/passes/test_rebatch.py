"""Re-batching a captured graph to fewer rows (guidance skipping): literals that carry the batch size."""
from __future__ import annotations

import pytest
import torch

from conftest import function_graph
from ditfx.graph import meta
from ditfx.graph.rebatch import rebatch

B, H, T = 2, 3, 5


def run_both(gm, fn, **inputs):
    """The re-batched graph and ``fn`` on ``inputs`` (the graph takes them in its placeholders' order)."""
    names = [meta.user_input_name(p) for p in gm.graph.find_nodes(op="placeholder")]
    return gm(*[inputs[n] for n in names])[0], fn(**inputs)


def flags(gm, *batch: str) -> list[bool]:
    return [meta.user_input_name(p) in batch for p in gm.graph.find_nodes(op="placeholder")]


def _per_head_mask(scores, mask):
    """diffusers' Attention.prepare_attention_mask: the (B, 1, T) mask repeated per head along the batch, with
    ``output_size`` (a literal, B * H, once Dynamo has captured the graph)."""
    m = mask.repeat_interleave(H, dim=0, output_size=mask.shape[0] * H)
    return scores + m.view(scores.shape[0], H, 1, -1)


def _per_head_mask_function(scores, mask):
    m = torch.repeat_interleave(mask, H, dim=0, output_size=mask.shape[0] * H)
    return scores + m.view(scores.shape[0], H, 1, -1)


def _flattened(scores, mask):
    """dim=None: a flat output of every element, output_size = numel."""
    m = mask.repeat_interleave(H, output_size=mask.numel() * H)
    return scores + m.view(scores.shape[0], H, 1, -1)


@pytest.mark.parametrize("fn", [_per_head_mask, _per_head_mask_function, _flattened])
@pytest.mark.parametrize("new_rows", [1, 3])
def test_repeat_interleave_output_size_follows_the_rows(fn, new_rows):
    scores, mask = torch.randn(B, H, T, T), torch.randn(B, 1, T)
    gm, _ = function_graph(fn, scores, mask)
    assert any(n.kwargs.get("output_size") is not None for n in gm.graph.nodes)  # the literal is captured
    small = rebatch(gm, B, new_rows, flags(gm, "scores", "mask"))
    got, expected = run_both(small, fn, scores=torch.randn(new_rows, H, T, T), mask=torch.randn(new_rows, 1, T))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_repeat_interleave_along_another_dim_keeps_its_output_size():
    """output_size along the tokens does not scale with the rows: left as it is (the graph re-batches)."""

    def fn(x):
        return x.repeat_interleave(2, dim=1, output_size=x.shape[1] * 2)

    gm, _ = function_graph(fn, torch.randn(B, 4, 3))
    small = rebatch(gm, B, 1, [True])
    (node,) = [n for n in small.graph.nodes if n.kwargs.get("output_size") is not None]
    assert node.kwargs["output_size"] == 8
    torch.testing.assert_close(*run_both(small, fn, x=torch.randn(1, 4, 3)), rtol=0, atol=0)


def test_a_repeat_that_does_not_read_the_batch_keeps_its_output_size():
    """A table repeated to a fixed size (here 2 * 3 = 6, a multiple of the rows) that the batch does not flow
    through: not a batch literal, left as it is."""

    def fn(x, table):
        return x + table.repeat_interleave(2, dim=0, output_size=table.shape[0] * 2).view(1, -1)

    gm, _ = function_graph(fn, torch.randn(B, 6), torch.randn(3))
    small = rebatch(gm, B, 1, flags(gm, "x"))
    (node,) = [n for n in small.graph.nodes if n.kwargs.get("output_size") is not None]
    assert node.kwargs["output_size"] == 6
    torch.testing.assert_close(*run_both(small, fn, x=torch.randn(1, 6), table=torch.randn(3)), rtol=0, atol=0)
