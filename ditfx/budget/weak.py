"""The weak mode as a graph transform: the captured graph of a DiT, rewritten to run at a coarser patch size.

Three sites of the captured graph change (shared/research/methods.md 3.7); the blocks keep their weights:

* the patch embedding, a convolution of the latents with kernel = stride = p, becomes one with kernel = stride
  = q whose kernel is an adapter input (``embed.weight``; PI-resize of the native kernel in the zero-shot mode);
* the positional table added to the embedded tokens becomes an adapter input (``pos_embed``) at the coarse grid:
  a fixed sin-cos table evaluated at coarse-patch centres, a learned or cropped table resampled;
* the de-embedding, the final linear before the unpatchify reshape, becomes one with q*q*C outputs
  (``deembed.weight``/``deembed.bias``), and the unpatchify follows;

then :func:`~ditfx.budget.retoken.retoken` moves every size literal that followed the token count. Optionally
each linear of the blocks (the token stream's and the adaLN modulation's) gains a low-rank update (LoRA, ``lora.<module>.down/up``) that
exists only in this graph, so the native mode stays the captured graph, bit for bit.
Where a site is missing, :class:`BudgetConversionError` says which.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditfx.budget.resize import coarse_table, pi_resize, resize_deembed
from ditfx.budget.retoken import RetokenError, retoken
from ditfx.graph import meta
from ditfx.graph.structure import InputRoles, find_blocks
from ditfx.report import TechniqueUnavailable

_LINEARS = {torch._C._nn.linear, F.linear}
_CONVS = {torch.conv2d, F.conv2d}
_PASS_THROUGH_METHODS = {"flatten", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "type_as"}
_ADDS = {operator.add, torch.add, operator.iadd}


class BudgetConversionError(TechniqueUnavailable):
    """The graph's model cannot be converted to a coarser patch size; the message names what is missing."""


@dataclass
class Sites:
    """Where the patch size lives in a captured graph."""

    latents: str
    conv: str  # the patch embedding: a convolution of the latents, or the linear of packed tokens
    embed_weight: str  # its kernel's placeholder, (D, C, p, p), or (D, C*p*p) for packed tokens
    patch: int
    grid: tuple[int, int]  # tokens per side
    width: int
    in_channels: int
    pos_add: str | None  # the add of the positional table to the embedded tokens (None: no table)
    pos_operand: str | None
    deembed: str  # the final linear before the unpatchify
    deembed_weight: str
    deembed_bias: str | None
    out_channels: int
    block_linears: list[tuple[str, str]] = field(default_factory=list)  # (linear node, module path) in the blocks
    # "conv": (B, C, H, W) latents patchified by a convolution; "packed": (B, h*w, C*p*p) tokens packed by the
    # pipeline (Flux and kin), embedded by a linear, placed by position ids fed to the model's rotary embedding
    kind: str = "conv"
    ids: str | None = None  # packed: the image position-id input, (h*w, 3)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    v = meta.tensor_value(node)
    return tuple(v.shape) if v is not None else None


def _ints(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _from_latents(node: fx.Node, latents: fx.Node) -> bool:
    """``node`` is the latents, maybe cast (``.to(dtype)``, ``.float()``)."""
    while node is not latents:
        if node.op == "call_method" and node.target in ("to", "float", "type_as", "contiguous"):
            node = node.args[0]
        else:
            return False
    return True


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")


def _call_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments by name, positional or keyword."""
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _bias_name(linear: fx.Node) -> str | None:
    bias = _call_args(linear, _LINEAR_ARGS).get("bias")
    return bias.name if isinstance(bias, fx.Node) else None


def find_sites(gm: fx.GraphModule, roles: InputRoles, example_inputs: list | None = None) -> Sites:
    """The patch embedding, positional table and de-embedding of ``gm``; raises :class:`BudgetConversionError`.
    ``example_inputs`` (real values) place packed tokens on their grid by their position ids."""
    if roles.latents is None:
        raise BudgetConversionError("no latents input found: token budgets need the latents the model patchifies")
    latents = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == roles.latents)
    shape = _shape(latents)
    if shape is not None and len(shape) == 3:
        return _packed_sites(gm, latents, shape, example_inputs)
    if shape is None or len(shape) != 4:
        raise BudgetConversionError(
            f"the latents input has shape {shape}: token budgets convert models that patchify (batch, channels, "
            "height, width) latents with a convolution (DiT, PixArt, SD3, Sana...) or take 2x2-packed tokens with "
            "position ids (Flux); video latents (Wan, LTX) are not converted yet")
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS
             and _from_latents(n.args[0], latents)]
    if len(convs) != 1:
        raise BudgetConversionError(f"found {len(convs)} convolutions of the latents, need exactly one: the patch "
                                    "embedding (kernel = stride = patch size)")
    conv = convs[0]
    args = _call_args(conv, _CONV_ARGS)
    weight = args["weight"]
    w_shape = _shape(weight)
    stride = _ints(args.get("stride", 1))
    if (weight.op != "placeholder" or w_shape is None or len(w_shape) != 4 or w_shape[2] != w_shape[3]
            or stride != (w_shape[2], w_shape[3]) or any(_ints(args.get("padding", 0)))
            or args.get("groups", 1) != 1):
        raise BudgetConversionError(f"the latents' convolution {conv.name} is not a patch embedding (a square "
                                    f"kernel equal to its stride, no padding, one group): kernel {w_shape}, "
                                    f"stride {stride}")
    patch = w_shape[2]
    out = _shape(conv)
    grid = (out[2], out[3])
    pos_add, pos_operand = _find_pos_add(conv, grid[0] * grid[1], w_shape[0])
    deembed, c_out = _find_deembed(gm, patch, grid)
    linears = _block_linears(gm)
    return Sites(latents=latents.name, conv=conv.name, embed_weight=weight.name, patch=patch, grid=grid,
                 width=w_shape[0], in_channels=w_shape[1], pos_add=pos_add and pos_add.name,
                 pos_operand=pos_operand and pos_operand.name, deembed=deembed.name,
                 deembed_weight=_call_args(deembed, _LINEAR_ARGS)["weight"].name, deembed_bias=_bias_name(deembed),
                 out_channels=c_out, block_linears=linears)


PACK = 2  # diffusers' packed-token pipelines (Flux, Chroma) pack 2x2 latent pixels per token


def _packed_sites(gm: fx.GraphModule, latents: fx.Node, shape, example_inputs) -> Sites:
    """Flux-style: tokens (B, h*w, C*2*2) packed by the pipeline, a linear embedding, position ids for the rotary
    embedding, and a final linear whose packed output is the model's output."""
    embeds = [u for u in latents.users if u.op == "call_function" and u.target in _LINEARS and u.args[0] is latents]
    if len(embeds) != 1 or not isinstance(embeds[0].args[1], fx.Node):
        raise BudgetConversionError("packed-token latents need exactly one linear embedding of the tokens, found "
                                    f"{len(embeds)}")
    embed = embeds[0]
    features = shape[2]
    if features % (PACK * PACK):
        raise BudgetConversionError(f"packed tokens of {features} features are not 2x2-packed latent channels")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    ids = [p for p in placeholders if "img_ids" in p.name or (
        (s := _shape(p)) is not None and len(s) == 2 and s == (shape[1], 3) and not meta.is_dynamo_weight(p))]
    if len(ids) != 1:
        raise BudgetConversionError("packed tokens need their (tokens, 3) image position ids as an input (Flux's "
                                    "img_ids) to place the coarse tokens; found none or several")
    grid = _packed_grid(ids[0], shape[1], placeholders, example_inputs)
    out = gm.graph.find_nodes(op="output")[0]
    flat: list[fx.Node] = []
    fx.node.map_arg(out.args[0], flat.append)
    final = flat[0] if flat else None
    while final is not None and final.op == "call_method" and final.target in ("contiguous", "to"):
        final = final.args[0]
    if final is None or not (final.op == "call_function" and final.target in _LINEARS)             or _shape(final)[-2:] != (shape[1], features) and _shape(final)[-2] != shape[1]:
        raise BudgetConversionError("packed tokens need the model's output to be a final linear's packed tokens")
    out_features = _shape(final)[-1]
    w = _shape(embed.args[1])
    linears = _block_linears(gm)
    return Sites(latents=latents.name, conv=embed.name, embed_weight=embed.args[1].name, patch=PACK, grid=grid,
                 width=w[0], in_channels=features // (PACK * PACK), pos_add=None, pos_operand=None,
                 deembed=final.name, deembed_weight=_call_args(final, _LINEAR_ARGS)["weight"].name,
                 deembed_bias=_bias_name(final),
                 out_channels=out_features // (PACK * PACK), block_linears=linears, kind="packed", ids=ids[0].name)


def _packed_grid(ids: fx.Node, tokens: int, placeholders, example_inputs) -> tuple[int, int]:
    """The token grid, from the position ids' values (row, column in columns 1, 2), else square."""
    if example_inputs is not None:
        value = example_inputs[placeholders.index(ids)]
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] >= 3:
            h, w = int(value[:, 1].max()) + 1, int(value[:, 2].max()) + 1
            expected = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
            if h * w == tokens and torch.equal(value[:, 1:3].round().long().cpu(), expected):
                return h, w
            raise BudgetConversionError("the image position ids are not a row-major grid of (row, column) ids: "
                                        "cannot place coarse tokens")
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise BudgetConversionError(f"{tokens} packed tokens and no position-id values to read the grid from")
    return side, side


def _block_linears(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node, module path) of every linear inside the repeated blocks: the token stream's and the blocks' own
    conditioning (adaLN modulation), so the weak mode can adapt both."""
    owner = find_blocks(gm)
    return [(n.name, meta.module_stack(n)[-1][0]) for n in gm.graph.nodes
            if n in owner and n.op == "call_function" and n.target in _LINEARS
            and isinstance(n.args[1], fx.Node) and meta.module_stack(n)]


def _batch_free(node: fx.Node) -> bool:
    """Computed from weights and constants only."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and not meta.is_dynamo_weight(n):
            return False
        todo.extend(n.all_input_nodes)
    return True


def _find_pos_add(conv: fx.Node, tokens: int, width: int) -> tuple[fx.Node | None, fx.Node | None]:
    node = conv
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, None
        user = users[0]
        if user.op == "call_method" and user.target in _PASS_THROUGH_METHODS and user.args[0] is node:
            node = user
            continue
        if user.op == "call_function" and user.target in _ADDS:
            other = next((a for a in user.args[:2] if isinstance(a, fx.Node) and a is not node), None)
            s = _shape(other) if other is not None else None
            if s is not None and s[-2:] == (tokens, width) and all(d == 1 for d in s[:-2]) and _batch_free(other):
                return user, other
        return None, None


def _find_deembed(gm, patch: int, grid: tuple[int, int]) -> tuple[fx.Node, int]:
    """The final linear whose (B, N, p*p*C) output the unpatchify reshapes to (B, h, w, p, p, C)."""
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function") or (n.op == "call_method" and n.target not in ("reshape", "view")) \
                or (n.op == "call_function" and n.target is not torch.reshape):
            continue
        s = _shape(n)
        if s is None or len(s) != 6 or s[1:5] != (*grid, patch, patch):
            continue
        src = n.args[0]
        while src.op == "call_method" and src.target in ("contiguous", "to", "squeeze"):
            src = src.args[0]
        if src.op == "call_function" and src.target in _LINEARS:
            w = src.args[1] if len(src.args) > 1 else src.kwargs["weight"]
            if isinstance(w, fx.Node) and w.op == "placeholder":
                return src, s[5]
    raise BudgetConversionError(
        "no unpatchify found: token budgets need the de-embedding as a linear layer to p*p*C features per token "
        "reshaped to (batch, h, w, p, p, C) (the DiT/diffusers unpatchify)")


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
        pos = _shape(nodes[sites.pos_operand])
        shapes["pos_embed"] = (*pos[:-2], tokens, pos[-1])
    d_in = _shape(nodes[sites.deembed_weight])[1]
    shapes["deembed.weight"] = (patch * patch * sites.out_channels, d_in)
    shapes["deembed.bias"] = (patch * patch * sites.out_channels,)
    if lora_rank:
        for name, path in sites.block_linears:
            w = _shape(nodes[name].args[1])
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


def evaluate(gm: fx.GraphModule, name: str, example_inputs: list) -> torch.Tensor:
    """The value of node ``name`` of ``gm`` on ``example_inputs``, computing only what it needs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    needed, todo = set(), [nodes[name]]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    interp = fx.Interpreter(gm)
    env = interp.env
    for ph, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        env[ph] = value
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in needed and n.op != "placeholder":
                env[n] = interp.run_node(n)
    return env[nodes[name]]


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
        table = evaluate(gm, sites.pos_operand, example_inputs).detach()
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
