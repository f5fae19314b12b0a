"""Where a DiT's patch size lives in its captured graph: the patch embedding (a convolution of the latents, or
the linear of packed tokens), the positional table added to the embedded tokens, the de-embedding before the
unpatchify, and the linears of the blocks. Token budgets rewrite these sites to a coarser patch size; history
attention's step heads replace the de-embedding's weights. :class:`SiteError` says which site is missing.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditfx.graph import meta
from ditfx.graph.structure import InputRoles, find_blocks
from ditfx.report import TechniqueUnavailable

LINEARS = {torch._C._nn.linear, F.linear}
_CONVS = {torch.conv2d, F.conv2d}
_PASS_THROUGH_METHODS = {"flatten", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "type_as"}
_ADDS = {operator.add, torch.add, operator.iadd}
PACK = 2  # diffusers' packed-token pipelines (Flux, Chroma) pack 2x2 latent pixels per token


class SiteError(TechniqueUnavailable):
    """A site a technique rewrites is not in the graph (or not in a form ditfx converts); the message says which."""


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


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
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
    """The patch embedding, positional table and de-embedding of ``gm``; raises :class:`SiteError`.
    ``example_inputs`` (real values) place packed tokens on their grid by their position ids."""
    if roles.latents is None:
        raise SiteError("no latents input found: token budgets need the latents the model patchifies")
    latents = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == roles.latents)
    shape = shape_of(latents)
    if shape is not None and len(shape) == 3:
        return _packed_sites(gm, latents, shape, example_inputs)
    if shape is None or len(shape) != 4:
        raise SiteError(
            f"the latents input has shape {shape}: token budgets convert models that patchify (batch, channels, "
            "height, width) latents with a convolution (DiT, PixArt, SD3, Sana...) or take 2x2-packed tokens with "
            "position ids (Flux); video latents (Wan, LTX) are not converted yet")
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS
             and _from_latents(n.args[0], latents)]
    if len(convs) != 1:
        raise SiteError(f"found {len(convs)} convolutions of the latents, need exactly one: the patch "
                                    "embedding (kernel = stride = patch size)")
    conv = convs[0]
    args = _call_args(conv, _CONV_ARGS)
    weight = args["weight"]
    w_shape = shape_of(weight)
    stride = _ints(args.get("stride", 1))
    if (weight.op != "placeholder" or w_shape is None or len(w_shape) != 4 or w_shape[2] != w_shape[3]
            or stride != (w_shape[2], w_shape[3]) or any(_ints(args.get("padding", 0)))
            or args.get("groups", 1) != 1):
        raise SiteError(f"the latents' convolution {conv.name} is not a patch embedding (a square "
                                    f"kernel equal to its stride, no padding, one group): kernel {w_shape}, "
                                    f"stride {stride}")
    patch = w_shape[2]
    out = shape_of(conv)
    grid = (out[2], out[3])
    pos_add, pos_operand = _find_pos_add(conv, grid[0] * grid[1], w_shape[0])
    deembed, c_out = _find_deembed(gm, patch, grid)
    linears = _block_linears(gm)
    return Sites(latents=latents.name, conv=conv.name, embed_weight=weight.name, patch=patch, grid=grid,
                 width=w_shape[0], in_channels=w_shape[1], pos_add=pos_add and pos_add.name,
                 pos_operand=pos_operand and pos_operand.name, deembed=deembed.name,
                 deembed_weight=_call_args(deembed, _LINEAR_ARGS)["weight"].name, deembed_bias=_bias_name(deembed),
                 out_channels=c_out, block_linears=linears)


def _packed_sites(gm: fx.GraphModule, latents: fx.Node, shape, example_inputs) -> Sites:
    """Flux-style: tokens (B, h*w, C*2*2) packed by the pipeline, a linear embedding, position ids for the rotary
    embedding, and a final linear whose packed output is the model's output."""
    embeds = [u for u in latents.users if u.op == "call_function" and u.target in LINEARS and u.args[0] is latents]
    if len(embeds) != 1 or not isinstance(embeds[0].args[1], fx.Node):
        raise SiteError("packed-token latents need exactly one linear embedding of the tokens, found "
                                    f"{len(embeds)}")
    embed = embeds[0]
    features = shape[2]
    if features % (PACK * PACK):
        raise SiteError(f"packed tokens of {features} features are not 2x2-packed latent channels")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    ids = [p for p in placeholders if "img_ids" in p.name or (
        (s := shape_of(p)) is not None and len(s) == 2 and s == (shape[1], 3) and not meta.is_dynamo_weight(p))]
    if len(ids) != 1:
        raise SiteError("packed tokens need their (tokens, 3) image position ids as an input (Flux's "
                                    "img_ids) to place the coarse tokens; found none or several")
    grid = _packed_grid(ids[0], shape[1], placeholders, example_inputs)
    out = gm.graph.find_nodes(op="output")[0]
    flat: list[fx.Node] = []
    fx.node.map_arg(out.args[0], flat.append)
    final = flat[0] if flat else None
    while final is not None and final.op == "call_method" and final.target in ("contiguous", "to"):
        final = final.args[0]
    if (final is None or not (final.op == "call_function" and final.target in LINEARS)
            or (shape_of(final)[-2:] != (shape[1], features) and shape_of(final)[-2] != shape[1])):
        raise SiteError("packed tokens need the model's output to be a final linear's packed tokens")
    out_features = shape_of(final)[-1]
    w = shape_of(embed.args[1])
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
            raise SiteError("the image position ids are not a row-major grid of (row, column) ids: "
                                        "cannot place coarse tokens")
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise SiteError(f"{tokens} packed tokens and no position-id values to read the grid from")
    return side, side


def _block_linears(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node, module path) of every linear inside the repeated blocks: the token stream's and the blocks' own
    conditioning (adaLN modulation), so the weak mode can adapt both."""
    owner = find_blocks(gm)
    return [(n.name, meta.module_stack(n)[-1][0]) for n in gm.graph.nodes
            if n in owner and n.op == "call_function" and n.target in LINEARS
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
            s = shape_of(other) if other is not None else None
            if s is not None and s[-2:] == (tokens, width) and all(d == 1 for d in s[:-2]) and _batch_free(other):
                return user, other
        return None, None


def _find_deembed(gm, patch: int, grid: tuple[int, int]) -> tuple[fx.Node, int]:
    """The final linear whose (B, N, p*p*C) output the unpatchify reshapes to (B, h, w, p, p, C)."""
    for n in gm.graph.nodes:
        if (n.op not in ("call_method", "call_function")
                or (n.op == "call_method" and n.target not in ("reshape", "view"))
                or (n.op == "call_function" and n.target is not torch.reshape)):
            continue
        s = shape_of(n)
        if s is None or len(s) != 6 or s[1:5] != (*grid, patch, patch):
            continue
        src = n.args[0]
        while src.op == "call_method" and src.target in ("contiguous", "to", "squeeze"):
            src = src.args[0]
        if src.op == "call_function" and src.target in LINEARS:
            w = src.args[1] if len(src.args) > 1 else src.kwargs["weight"]
            if isinstance(w, fx.Node) and w.op == "placeholder":
                return src, s[5]
    raise SiteError(
        "no unpatchify found: token budgets need the de-embedding as a linear layer to p*p*C features per token "
        "reshaped to (batch, h, w, p, p, C) (the DiT/diffusers unpatchify)")
