"""The weak mode as a graph transform: the captured graph of a DiT, rewritten to run at a coarser patch size.

Three sites of the captured graph change (shared/research/methods.md 3.7); the blocks keep their weights:

* the patch embedding, a convolution of the latents with kernel = stride = p, becomes one with kernel = stride
  = q whose kernel is an adapter input (``embed.weight``; PI-resize of the native kernel in the zero-shot mode);
* the positional table added to the embedded tokens becomes an adapter input (``pos_embed``) at the coarse grid:
  a fixed sin-cos table evaluated at coarse-patch centres, a learned or cropped table resampled;
* the de-embedding, the final linear before the unpatchify reshape, becomes one with q*q*C outputs
  (``deembed.weight``/``deembed.bias``), and the unpatchify follows;

then :func:`~ditfx.graph.retoken.retoken` moves every size literal that followed the token count. Optionally
each linear of the blocks (the token stream's and the adaLN modulation's) gains a low-rank update (LoRA,
``lora.<module>.down/up``) that exists only in this graph, so the native mode stays the captured graph, bit for bit.
Where a site is missing, :class:`BudgetConversionError` says which.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditfx.budget.resize import coarse_table, pi_resize, resize_deembed
from ditfx.graph import meta
from ditfx.graph.retoken import RetokenError, retoken
from ditfx.graph.sites import SiteError, Sites, shape_of


class BudgetConversionError(SiteError):
    """The graph's model cannot be converted to a coarser patch size; the message names what is missing (a
    missing site, :func:`~ditfx.graph.sites.find_sites`, raises the base class)."""


@dataclass
class WeakGraph:
    """A captured graph rewritten to patch size ``patch``; its last placeholders are the adapter tensors ``keys``."""

    gm: fx.GraphModule
    sites: Sites
    patch: int
    keys: list[str]  # adapter tensor names, in placeholder order (after the captured inputs)
    placeholders: list[str]  # their placeholder names
    shapes: dict[str, tuple[int, ...]]
    lora_rank: int = 0

    @property
    def tokens(self) -> int:
        return (self.sites.grid[0] // self.stride) * (self.sites.grid[1] // self.stride)

    @property
    def stride(self) -> int:
        return self.patch // self.sites.patch


def adapter_shapes(sites: Sites, patch: int, lora_rank: int, gm: fx.GraphModule,
                   merged: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors a weak mode at ``patch`` takes, by name (``merged``: one merged weight per block linear in place
    of the low-rank pair)."""
    s = patch // sites.patch
    tokens = (sites.grid[0] // s) * (sites.grid[1] // s)
    nodes = {n.name: n for n in gm.graph.nodes}
    if sites.kind == "packed":  # features of s x s packed tokens, (ty, tx, c, py, px)
        shapes = {"embed.weight": (sites.width, s * s * sites.in_channels * sites.patch ** 2)}
    else:
        shapes = {"embed.weight": (sites.width, sites.in_channels, patch, patch)}
    if sites.pos_operand is not None:
        pos = shape_of(nodes[sites.pos_operand])
        shapes["pos_embed"] = (*pos[:-2], tokens, pos[-1])
    d_in = shape_of(nodes[sites.deembed_weight])[1]
    shapes["deembed.weight"] = (patch * patch * sites.out_channels, d_in)
    shapes["deembed.bias"] = (patch * patch * sites.out_channels,)
    if lora_rank:
        for name, path in sites.block_linears:
            w = shape_of(nodes[name].args[1])
            if merged:
                shapes[f"lora.{path}.merged"] = w
            else:
                shapes[f"lora.{path}.down"] = (lora_rank, w[1])
                shapes[f"lora.{path}.up"] = (w[0], lora_rank)
    return shapes


def merge_lora(gm: fx.GraphModule, sites: Sites, example_inputs: list,
               tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors with each low-rank pair folded into its linear's weight, ``W + up @ down``: the weak
    mode then costs what the base model's linears cost (a rank-r update on a width-D linear adds 2r/D)."""
    values = {ph.name: v for ph, v in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    for name, path in sites.block_linears:
        w = values[nodes[name].args[1].name].detach()
        delta = tensors[f"lora.{path}.up"].double() @ tensors[f"lora.{path}.down"].double()
        out[f"lora.{path}.merged"] = (w.double() + delta.to(w.device)).to(w.dtype)
    return out


def weak_graph(gm: fx.GraphModule, sites: Sites, patch: int, lora_rank: int = 0, merged: bool = False) -> WeakGraph:
    """A copy of ``gm`` at patch size ``patch`` (a multiple of the native one dividing the grid); with
    ``lora_rank``, its block linears take a low-rank update, or (``merged``) merged weights (:func:`merge_lora`)."""
    p = sites.patch
    if patch <= p or patch % p:
        raise BudgetConversionError(f"the weak patch size must be a multiple of the native {p} above it, got {patch}")
    s = patch // p
    if sites.grid[0] % s or sites.grid[1] % s:
        raise BudgetConversionError(f"patch size {patch} does not tile the {sites.grid[0]}x{sites.grid[1]} grid of "
                                    f"native {p}x{p} patches")
    shapes = adapter_shapes(sites, patch, lora_rank, gm, merged)
    out = copy.deepcopy(gm)
    g = out.graph
    nodes = {n.name: n for n in g.nodes}
    last = list(g.find_nodes(op="placeholder"))[-1]
    ref = meta.tensor_value(nodes[sites.embed_weight])
    added: dict[str, fx.Node] = {}
    for key in shapes:
        with g.inserting_after(last):
            ph = g.placeholder("budget_" + key.replace(".", "_"))
        last = added[key] = ph
    if sites.kind == "packed":
        _packed_weak(g, nodes, sites, s, added)
    else:  # patch embedding: the adapter's kernel, stride q
        conv = nodes[sites.conv]
        args = list(conv.args)
        args[1] = added["embed.weight"]
        if len(args) > 3:
            args[3] = (patch, patch)
        conv.args = tuple(args)
        if "stride" in conv.kwargs or len(args) <= 3:
            conv.update_kwarg("stride", (patch, patch))
    # positional table
    if sites.pos_add is not None:
        nodes[sites.pos_add].replace_input_with(nodes[sites.pos_operand], added["pos_embed"])
    # de-embedding
    lin = nodes[sites.deembed]
    users = list(lin.users)
    lin.replace_input_with(nodes[sites.deembed_weight], added["deembed.weight"])
    if sites.deembed_bias is not None:
        lin.replace_input_with(nodes[sites.deembed_bias], added["deembed.bias"])
    else:
        lin.args = (*lin.args[:2], added["deembed.bias"])
    if sites.kind == "packed":  # the coarse tokens back to the native packed tokens the model returns
        rows = meta.tensor_value(nodes[sites.latents]).shape[0]
        h, w = sites.grid
        with g.inserting_after(lin):
            v = g.call_method("view", (lin, rows, h // s, w // s, s, s, -1))
        with g.inserting_after(v):
            t = g.call_method("permute", (v, 0, 1, 3, 2, 4, 5))
        with g.inserting_after(t):
            back = g.call_method("reshape", (t, rows, h * w, -1))
        for u in users:
            u.replace_input_with(lin, back)
    g.eliminate_dead_code()
    out.recompile()
    inputs = {ph.name: torch.empty(shapes[key], dtype=ref.dtype, device=ref.device) for key, ph in added.items()}
    h, w = sites.grid
    seeds = {h: h // s, w: w // s, p: patch, h * w: (h // s) * (w // s)}
    try:
        retoken(out, inputs, seeds)
    except RetokenError as e:
        raise BudgetConversionError(f"cannot run this graph at patch size {patch}: {e}") from e
    if lora_rank and merged:
        for name, path in sites.block_linears:
            nodes[name].replace_input_with(nodes[name].args[1], added[f"lora.{path}.merged"])
        out.recompile()
    elif lora_rank:  # after the literals moved: the low-rank path has none, and its nodes get the new shapes
        _insert_lora(g, nodes, sites, added)
        out.recompile()
        retoken(out, {}, {})
    return WeakGraph(out, sites, patch, list(shapes), [added[k].name for k in shapes], shapes, lora_rank)


def _packed_weak(g: fx.Graph, nodes: dict, sites: Sites, s: int, added: dict[str, fx.Node]) -> None:
    """Packed tokens grouped s x s into coarse tokens before the embedding, and the position ids at the coarse
    tokens' centres (``s * i + s / 2`` in native token units) for the model's own rotary embedding."""
    rows = meta.tensor_value(nodes[sites.latents]).shape[0]
    h, w = sites.grid
    latents, embed = nodes[sites.latents], nodes[sites.conv]
    with g.inserting_before(embed):
        v = g.call_method("view", (latents, rows, h // s, s, w // s, s, -1))
        t = g.call_method("permute", (v, 0, 1, 3, 2, 4, 5))
        coarse = g.call_method("reshape", (t, rows, (h // s) * (w // s), -1))
    embed.replace_input_with(latents, coarse)
    embed.replace_input_with(nodes[sites.embed_weight], added["embed.weight"])
    ids = nodes[sites.ids]
    users = list(ids.users)
    with g.inserting_after(ids):
        grid = g.call_method("view", (ids, h // s, s, w // s, s, -1))
    with g.inserting_after(grid):
        corner = g.call_function(operator.getitem, (grid, (slice(None), 0, slice(None), 0)))
    with g.inserting_after(corner):
        flat = g.call_method("reshape", (corner, (h // s) * (w // s), -1))
    with g.inserting_after(flat):
        offset = g.call_function(torch.tensor, ([0.0, s / 2, s / 2],), {"dtype": torch.float32})
    with g.inserting_after(offset):
        centred = g.call_function(operator.add, (flat, offset))
    for u in users:
        u.replace_input_with(ids, centred)


def _insert_lora(g: fx.Graph, nodes: dict, sites: Sites, added: dict[str, fx.Node]) -> None:
    """y = linear(x, W, b) + linear(linear(x, down), up): zero while ``up`` is zero."""
    for name, path in sites.block_linears:
        lin = nodes[name]
        users = list(lin.users)
        with g.inserting_after(lin):
            low = g.call_function(torch._C._nn.linear, (lin.args[0], added[f"lora.{path}.down"]))
        with g.inserting_after(low):
            up = g.call_function(torch._C._nn.linear, (low, added[f"lora.{path}.up"]))
        with g.inserting_after(up):
            total = g.call_function(operator.add, (lin, up))
        for new in (low, up, total):  # the block's own nodes: the region split reads the module stack
            new.meta.update({k: v for k, v in lin.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for u in users:
            u.replace_input_with(lin, total)


# ------------------------------------------------------------------------------------------ zero-shot


def zero_shot_tensors(gm: fx.GraphModule, sites: Sites, example_inputs: list, patch: int,
                      resize: str = "bilinear") -> dict[str, torch.Tensor]:
    """The weak mode's tensors from the native ones, without training: PI-resize of the embedding kernel, the
    de-embedding resized per channel, the positional table at coarse-patch centres."""
    values = {ph.name: v for ph, v in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)}
    s = patch // sites.patch
    if sites.kind == "packed":
        return _packed_zero_shot(values, sites, s, resize)
    out = {"embed.weight": pi_resize(values[sites.embed_weight].detach(), patch, resize)}
    if sites.pos_operand is not None:
        table = meta.evaluate(gm, sites.pos_operand, example_inputs).detach()
        flat = table.reshape(sites.tokens, sites.width)
        coarse = coarse_table(flat, sites.grid, s)
        out["pos_embed"] = coarse.reshape(*table.shape[:-2], -1, sites.width).to(table.dtype)
    weight = values[sites.deembed_weight].detach()
    bias = values[sites.deembed_bias].detach() if sites.deembed_bias else torch.zeros(weight.shape[0],
                                                                                       dtype=weight.dtype)
    out["deembed.weight"], out["deembed.bias"] = resize_deembed(weight, bias, sites.patch, patch,
                                                                sites.out_channels, "ppc", resize)
    return out


def _packed_zero_shot(values: dict, sites: Sites, s: int, resize: str) -> dict[str, torch.Tensor]:
    """PI-resize in latent pixels for packed tokens: a native token packs (c, py, px), a coarse one
    (ty, tx, c, py, px) with pixel (p * ty + py, p * tx + px)."""
    p, c, q = sites.patch, sites.in_channels, sites.patch * s
    w = values[sites.embed_weight].detach()  # (D, c*p*p)
    kernel = pi_resize(w.reshape(w.shape[0], c, p, p), q, resize)  # (D, c, q, q)
    embed = kernel.reshape(w.shape[0], c, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(w.shape[0], -1)
    weight = values[sites.deembed_weight].detach()  # (c_out*p*p, D)
    bias = values[sites.deembed_bias].detach() if sites.deembed_bias else torch.zeros(weight.shape[0],
                                                                                       dtype=weight.dtype)
    c_out = sites.out_channels
    dw, db = resize_deembed(weight, bias, p, q, c_out, "cpp", resize)  # (c_out*q*q, ...) as (c, Y, X)

    def order(t: torch.Tensor) -> torch.Tensor:  # (c, ty, py, tx, px) -> (ty, tx, c, py, px)
        rest = t.shape[1:]
        return t.reshape(c_out, s, p, s, p, *rest).permute(1, 3, 0, 2, 4, *range(5, 5 + len(rest))).reshape(
            c_out * q * q, *rest)

    return {"embed.weight": embed, "deembed.weight": order(dw), "deembed.bias": order(db)}
