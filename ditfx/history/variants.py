"""History attention's graph variants (its pass, ARD): the lower N blocks' self-attention also reads this
generation's earlier steps.

In each of the first N blocks on the latent stream, every scaled-dot-product attention whose keys come from the
block's own stream (self-attention over the image tokens, or joint text + image attention, whose text keys are
kept per step) gets the ``history.kv`` variant::

    sdpa(q, k, v)   ->   sdpa(q, cat(K_hist, k), cat(V_hist, v), mask = cat(valid_hist, ones))   and returns k, v

``K_hist``/``V_hist`` are a static buffer of ``steps x keys`` positions per sample (gpt-fast's KV cache: written at
positions, never reallocated, one graph for every step) and ``valid_hist`` marks the positions written so far;
the policy (:mod:`ditfx.history.policy`) writes each call's k, v at its step's positions. Cross-attention (keys
from the text only) is unchanged.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.attention import plain_attention, positional_qkv, self_attention_sites
from ditfx.graph.sites import SiteError, find_sites
from ditfx.history.config import HistoryAttention
from ditfx.plan import Plan, Transform, VariantUnavailable
from ditfx.report import PassReport, TechniqueUnavailable
from ditfx.technique import PassContext

# the variants the history policy runs (declared here, once)
HISTORY = "history.kv"
HEADS = "history.heads"  # the epilogue variant whose de-embedding takes the step's head


def history_at(step: int) -> str:
    """The block variant of step ``step``: it reads the ``step`` earlier steps' keys and values (a prefix of the
    static buffer), so each step attends to the keys that exist and no more."""
    return f"{HISTORY}@{step}"


@dataclass
class HistoryReport(PassReport):
    pass_name = "history"

    layers: int
    steps: int
    blocks: list[str] = field(default_factory=list)
    sites: dict[str, int] = field(default_factory=dict)  # block -> attention sites with history

    def summary(self) -> str:
        return (f"history: the lower {self.layers} block(s) {self.blocks} attend to up to {self.steps} steps of "
                f"history ({sum(self.sites.values())} attention site(s))")


def history_variant(gm: fx.GraphModule, stream_input: int, steps: int) -> fx.GraphModule:
    """The block reading ``steps`` x keys of history per attention site (0: none, it only returns its own): extra
    inputs (k_hist, v_hist, valid) per site after the block's own, extra outputs (k, v) per site after its own."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    sites = self_attention_sites(gm, list(g.find_nodes(op="placeholder"))[stream_input])
    if not sites:
        raise VariantUnavailable("the block has no self-attention over its own stream")
    last = list(g.find_nodes(op="placeholder"))[-1]
    out = g.find_nodes(op="output")[0]
    extra_out: list[fx.Node] = []
    for j, n in enumerate(sites):
        if not plain_attention(n):
            raise VariantUnavailable(f"{n.name} has a mask, dropout or causal flag: history attention needs plain "
                                     "self-attention")
        positional_qkv(n)
        q, k, v = n.args[:3]
        kv = meta.tensor_value(k)
        if kv is None or kv.dim() != 4:
            raise VariantUnavailable(f"{n.name}: keys of shape {None if kv is None else tuple(kv.shape)}, need "
                                     "(batch, heads, keys, head_dim)")
        b, h, length, d = kv.shape
        size = steps * length
        names = (f"hist_k{j}", f"hist_v{j}", f"hist_valid{j}")
        shapes = ((b, h, size, d), (b, h, size, meta.tensor_value(v).shape[-1]), (b, size))
        dtypes = (kv.dtype, meta.tensor_value(v).dtype, torch.bool)
        new = []
        for name, shape, dtype in zip(names, shapes, dtypes):
            with g.inserting_after(last):
                last = g.placeholder(name)
            with getattr(kv, "fake_mode", None) or contextlib.nullcontext():  # a fake value like the captured ones
                last.meta["example_value"] = torch.empty(shape, dtype=dtype, device=kv.device)
            new.append(last)
        hk, hv, valid = new
        with g.inserting_before(n):
            keys = g.call_function(torch.cat, ([hk, k],), {"dim": 2})
            values = g.call_function(torch.cat, ([hv, v],), {"dim": 2})
            own = g.call_function(torch.ones_like, (g.call_function(
                torch.select, (g.call_function(torch.select, (k, 1, 0)), 2, 0)),), {"dtype": torch.bool})
            mask = g.call_function(torch.cat, ([valid, own],), {"dim": 1})
            mask4 = g.call_method("view", (mask, -1, 1, 1, size + length))
        n.args = (q, keys, values)
        n.kwargs = {**({"scale": n.kwargs["scale"]} if "scale" in n.kwargs else {}), "attn_mask": mask4}
        extra_out += [k, v]
    out.args = (tuple(out.args[0]) + tuple(extra_out),)
    gm.recompile()
    return gm


def offer(plan: Plan, cfg: HistoryAttention, ctx: PassContext) -> HistoryReport:
    """History attention's pass: each step's variant of the lower blocks (and the step heads' epilogue)."""
    lower = plan.structure.latent_blocks[:cfg.layers]
    if len(lower) < cfg.layers:
        raise TechniqueUnavailable(f"HistoryAttention(layers={cfg.layers}) asks for more blocks than the "
                                   f"{len(plan.structure.latent_blocks)} on this model's latent stream")

    names = [history_at(step) for step in range(cfg.steps)]
    for step, name in enumerate(names):
        plan.transforms[name] = Transform(name, lambda rm, gm, s=step: history_variant(
            gm, rm.region.streams[rm.region.primary_stream][1], s))
    report = HistoryReport(cfg.layers, cfg.steps)
    if cfg.heads is not None:
        _offer_heads(plan, ctx)
    for rm in plan.regions:
        if rm.region.kind == "block" and rm.region.block.index in lower:
            if rm.region.primary_stream is None:
                raise TechniqueUnavailable(f"{rm.region.name} has no residual stream ditfx can follow")
            plan.offers.setdefault(rm.region.name, set()).update(names)
            try:  # the first step's variant built now: a block that cannot take history says so before any call
                gm = plan.graph(rm, plan.key(rm, (names[0],)))
            except VariantUnavailable as e:
                for offers in plan.offers.values():  # the technique is off: no region offers it
                    offers.difference_update([*names, HEADS])
                raise TechniqueUnavailable(f"{rm.region.name}: {e}") from e
            report.blocks.append(rm.region.block.path)
            report.sites[rm.region.block.path] = (len(gm.graph.find_nodes(op="placeholder"))
                                                  - len(rm.region.inputs)) // 3
    return report


def heads_variant(gm: fx.GraphModule, weight: int, bias: int | None) -> fx.GraphModule:
    """The epilogue with its de-embedding's weight and bias read from two new inputs (the step's head)."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    placeholders = list(g.find_nodes(op="placeholder"))
    last = placeholders[-1]
    with g.inserting_after(last):
        head_w = g.placeholder("head_weight")
    with g.inserting_after(head_w):
        head_b = g.placeholder("head_bias")
    for new, old in ((head_w, placeholders[weight]), (head_b, placeholders[bias] if bias is not None else None)):
        if old is not None:
            new.meta = dict(old.meta)
            old.replace_all_uses_with(new)
    gm.recompile()
    return gm


def _offer_heads(plan: Plan, ctx: PassContext) -> None:
    """Step-specific output heads: the epilogue's de-embedding linear takes each step's head."""
    try:
        sites = find_sites(plan.structure.gm, plan.structure.roles, ctx.example_inputs)
    except SiteError as e:
        raise TechniqueUnavailable(f"step heads need the de-embedding linear: {e}") from e
    for rm in plan.regions:
        names = [n.name for n in rm.region.inputs]
        if sites.deembed in {n.name for n in rm.region.nodes} and sites.deembed_weight in names:
            bias = names.index(sites.deembed_bias) if sites.deembed_bias in names else None
            weight = names.index(sites.deembed_weight)
            # after re-batching (the head is not a batch row), compiled as the epilogue it replaces
            plan.transforms[HEADS] = Transform(HEADS, lambda _rm, gm, w=weight, b=bias: heads_variant(gm, w, b),
                                               after_rows=True, compiled=True)
            plan.offers.setdefault(rm.region.name, set()).add(HEADS)
            return
    raise TechniqueUnavailable("step heads: no region holds the de-embedding linear with its weight as an input")
