"""ARD's one-shot training forward: all S steps of a generation in one call, teacher-forced.

The steps are stacked along the batch, step-major (rows ``s*B .. s*B+B-1`` are step s): each row carries its own
timestep, so the per-token time embedding of the paper (each step's tokens modulated by their own time) is the
model's own per-sample conditioning, with no rewrite. Only the attention changes: in the lower N blocks a row's
queries attend to the keys of the same sample's steps <= s (block-causal, :func:`stepwise_attention` over a
flex_attention BlockMask), above to its own step's keys (block-diagonal: the unchanged attention of each row).
Run step by step with the key/value history (:mod:`ditfx.history.variants`), the same model gives the same
outputs (tests/test_history.py).
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.attention import plain_attention, positional_qkv, sdpa_qkv
from ditfx.graph.sites import find_sites
from ditfx.graph.structure import analyse, find_blocks
from ditfx.history.masks import block_causal, block_mask, dense
from ditfx.runtime.compiler import keep_dynamo_compiling


@functools.lru_cache(maxsize=16)
def _causal_mask(tokens: int, steps: int, device: str):
    return block_mask(block_causal(tokens), tokens * steps, device=device)


@functools.lru_cache(maxsize=16)
def _dense_causal_mask(tokens: int, steps: int, device: str):
    return dense(block_causal(tokens), tokens * steps).to(device)


def stepwise_attention(q, k, v, steps: int, scale=None):
    """Attention of (S*B, H, L, d) queries over the keys of the same sample's steps <= their own (rows stacked
    step-major): block-causal over the S*L tokens of each sample."""
    from torch.nn.attention.flex_attention import flex_attention

    rows, heads, length = q.shape[:3]
    batch = rows // steps

    def per_sample(x):  # (S*B, H, L, d) -> (B, H, S*L, d)
        return x.reshape(steps, batch, heads, x.shape[2], x.shape[3]).permute(1, 2, 0, 3, 4).reshape(
            batch, heads, steps * x.shape[2], x.shape[3])

    q, k, v = per_sample(q), per_sample(k), per_sample(v)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        # flex_attention has no backward on CPU: training there uses SDPA with the same mask, dense
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=_dense_causal_mask(length, steps, str(q.device)), scale=scale)
    else:
        out = flex_attention(q, k, v, scale=scale, block_mask=_causal_mask(length, steps, str(q.device)))
    return out.reshape(batch, heads, steps, length, out.shape[-1]).permute(2, 0, 1, 3, 4).reshape(
        rows, heads, length, out.shape[-1])


def stepwise_linear(x, weight, bias, steps: int):
    """The de-embedding with step-specific heads: rows of step s (stacked step-major) use ``weight[s]``,
    ``bias[s]`` ((S, out, in), (S, out))."""
    rows = x.shape[0]
    per_step = x.reshape(steps, rows // steps, *x.shape[1:])
    out = torch.einsum("s b ... i, s o i -> s b ... o", per_step, weight)
    out = out + bias.reshape(steps, 1, *([1] * (x.dim() - 2)), bias.shape[-1])
    return out.reshape(rows, *out.shape[2:])


def oneshot_graph(gm: fx.GraphModule, steps: int, layers: int, heads: bool = False,
                  example_inputs: list | None = None) -> fx.GraphModule:
    """A copy of the captured graph (at S*B rows) whose lower ``layers`` blocks' self-attention is block-causal
    across the stacked steps; ``heads``: the de-embedding takes two more inputs, the step heads
    ((S, out, in), (S, out))."""
    out = copy.deepcopy(gm)
    structure = analyse(out)
    if heads:
        _stepwise_heads(out, structure, steps, example_inputs)
    lower = {structure.blocks[i].path for i in structure.latent_blocks[:layers]}
    owner = find_blocks(out)
    latents = next(n for n in out.graph.find_nodes(op="placeholder") if n.name == structure.roles.latents)
    stream = meta.dependents(out.graph, [latents])
    rewritten = 0
    for n in list(out.graph.nodes):
        if owner.get(n) not in lower or not meta.is_attention(n) or "scaled_dot_product" not in meta.target_name(n):
            continue
        if sdpa_qkv(n)[1] not in stream:  # cross-attention to the text: no history
            continue
        if not plain_attention(n):
            raise ValueError(f"{n.name}: history attention needs plain self-attention (no mask, dropout or causal "
                             "flag)")
        positional_qkv(n)
        with out.graph.inserting_before(n):
            new = out.graph.call_function(stepwise_attention, tuple(n.args[:3]),
                                          {"steps": steps, "scale": n.kwargs.get("scale")})
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        out.graph.erase_node(n)
        rewritten += 1
    if layers and not rewritten:
        raise ValueError("no self-attention found in the lower blocks")
    out.recompile()
    return out


def _stepwise_heads(gm: fx.GraphModule, structure, steps: int, example_inputs) -> None:
    sites = find_sites(gm, structure.roles, example_inputs)
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    last = list(g.find_nodes(op="placeholder"))[-1]
    with g.inserting_after(last):
        head_w = g.placeholder("head_weight")
    with g.inserting_after(head_w):
        head_b = g.placeholder("head_bias")
    lin = nodes[sites.deembed]
    with g.inserting_before(lin):
        new = g.call_function(stepwise_linear, (lin.args[0], head_w, head_b), {"steps": steps})
    new.meta = dict(lin.meta)
    lin.replace_all_uses_with(new)
    g.erase_node(lin)


class OneShot:
    """A torch.compile backend: whatever Dynamo captures (at S*B rows) runs as the one-shot training forward
    (with ``heads``, {"weight": (S, out, in), "bias": (S, out)}, appended as the step heads)."""

    def __init__(self, steps: int, layers: int, heads: dict | None = None):
        self.steps, self.layers, self.heads = steps, layers, heads

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        keep_dynamo_compiling()
        graph = oneshot_graph(gm, self.steps, self.layers, self.heads is not None, example_inputs)
        if self.heads is None:
            return graph.forward
        heads = (self.heads["weight"], self.heads["bias"])
        return lambda *args: graph(*args, *heads)


def one_shot(model: torch.nn.Module, steps: int, layers: int, heads: dict | None = None):
    """``model`` as ARD's one-shot training forward over ``steps`` steps stacked along the batch (step-major)."""
    return torch.compile(model, backend=OneShot(steps, layers, heads), dynamic=False)
