"""Kernel lowering of the regions (``Config(kernels=True)``): DiT's adaLN and gated-residual patterns become
``torch.ops.ditfx`` calls.

Patterns, in a region's Dynamo graph (x, y: ``(B, T, D)``; scale, shift, gate: per sample ``(B, D)``
lifted by ``unsqueeze(1)`` / ``[:, None]``, or ``(B, 1, D)``)::

    adaLN   (reference DiT ``modulate(norm(x), shift, scale)``; diffusers AdaLayerNormZero,
             AdaLayerNormContinuous, PixArt's scale-shift table)

        n   = layer_norm(x, (D,), None, None, eps)
        out = n * (1 + scale) + shift            ->  out = ditfx.adaln_modulate(x, shift, scale, eps)

        any other modulation chain after a layer norm without affine (``n * a + b`` where the
        ``1 +`` was computed elsewhere, a per-token scale, ...)
                                                 ->  out = ditfx.fused_elementwise(expr, spec, [x, ..], eps)

    gated residual  (adaLN-Zero: ``x + gate_msa.unsqueeze(1) * attn(...)``)

        out = x + gate * y                       ->  out = ditfx.gated_residual(x, gate, y)

        variants (per-token gate, ``y / c``, more terms)
                                                 ->  out = ditfx.fused_elementwise(expr, spec, [..])

The elementwise part of a match is read into sympy (:mod:`ditfx.graph.elementwise`); when it is
exactly a fixed kernel's formula the fixed kernel is used, otherwise the expression itself is the
argument of ``fused_elementwise``, whose Triton source is generated per expression and dtypes
(:mod:`ditfx.kernels.codegen`). A match whose shapes or dtypes do not fit the op's contract is
left as it is and listed in the report.
"""
from __future__ import annotations

import copy
import hashlib
import operator
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

import ditfx.kernels
import ditfx.kernels.codegen as codegen
import ditfx.kernels.expression as expression
from ditfx.graph import meta
from ditfx.graph.elementwise import (
    Expression,
    NotElementwise,
    arithmetic,
    operand_kind,
    read_expression,
    same_rank,
)
from ditfx.graph.regions import RegionModule
from ditfx.kernels.fused_elementwise.spec import format_spec, result_dtype
from ditfx.report import PassReport

_KERNELS_DIR = Path(ditfx.kernels.__file__).parent
_LAYER_NORMS = (F.layer_norm, torch.layer_norm)


@dataclass
class Match:
    """A pattern found in a graph: which one, its elementwise expression, the layer norm's eps."""

    pattern: str  # "adaln" or "gated_residual"
    expression: Expression
    eps: float | None = None


@dataclass
class Lowering:
    """What a match becomes: a call of ``op`` on ``args``, and the kernel that runs it."""

    kernel: str
    op: torch._ops.OpOverload
    args: tuple
    source: str


@dataclass
class FusionSite:
    """One lowered site: the nodes it replaced (the last one is the value kept), the kernel."""

    pattern: str
    nodes: list[str]
    kernel: str
    expression: str
    source_hash: str


@dataclass
class FusionReport(PassReport):
    """What the pass did, per region: lowered sites, matches left alone (and why), kernel sources."""

    pass_name = "fusion"

    sites: dict[str, list[FusionSite]] = field(default_factory=dict)
    not_lowered: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # kernel name -> Triton source

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.sites.values())

    def kernel_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sites in self.sites.values():
            for s in sites:
                counts[s.kernel] = counts.get(s.kernel, 0) + 1
        return counts

    def summary(self) -> str:
        kernels = ", ".join(f"{k} x{n}" for k, n in self.kernel_counts().items())
        text = f"fusion: {self.total} site(s) lowered in {len(self.sites)} region(s): {kernels or 'none'}"
        for region, reasons in self.not_lowered.items():
            for why in reasons:
                text += f"\n  {region}: not lowered: {why}"
        return text


# ----------------------------------------------------------------------------------------- patterns


def plain_layer_norm_eps(node: fx.Node) -> float | None:
    """eps of ``layer_norm(x, (D,), None, None, eps)`` over the last axis of a 3-D x, else None."""
    if node.op != "call_function" or node.target not in _LAYER_NORMS:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    x = meta.tensor_value(args.get("input"))
    if x is None or x.dim() != 3 or args.get("weight") is not None or args.get("bias") is not None:
        return None
    shape = args.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list, torch.Size)) or tuple(shape) != (x.shape[-1],):
        return None
    eps = args.get("eps", 1e-5)
    return float(eps) if isinstance(eps, (int, float)) else None


def modulation_end(norm: fx.Node) -> fx.Node | None:
    """The last node of the elementwise chain that modulates a layer norm's output, or None.

    Follows single users through arithmetic on (B, T, D) values whose other operands are kernel
    operands (per sample, per token, full, scalar, numbers).
    """
    shape = tuple(meta.tensor_value(norm).shape)
    end = norm
    while len(end.users) == 1:
        user = next(iter(end.users))
        value = meta.tensor_value(user)
        if arithmetic(user) is None or value is None or tuple(value.shape) != shape:
            break
        others = [a for a in user.args if isinstance(a, fx.Node) and a is not end]
        if any(_kind(a, shape) is None for a in others):
            break
        end = user
    return end if end is not norm else None


def is_gated_product(node: fx.Node, shape: tuple) -> bool:
    """``gate * y`` with y (B, T, D) and gate per sample, per token or full, used once."""
    if arithmetic(node) is not operator.mul or len(node.users) != 1 or not same_rank(node):
        return False
    kinds = sorted(_kind(a, shape) or "" for a in node.args)
    return kinds in (["full", "full"], ["full", "per_sample"], ["full", "per_token"])


def is_gated_residual(node: fx.Node) -> bool:
    """``x + gate * y`` (either order) with x, y (B, T, D)."""
    value = meta.tensor_value(node)
    if arithmetic(node) is not operator.add or value is None or value.dim() != 3:
        return False
    shape = tuple(value.shape)
    a, b = node.args
    return any(
        isinstance(p, fx.Node) and is_gated_product(p, shape) and _kind(q, shape) == "full"
        for p, q in ((a, b), (b, a))
    )


def find_matches(graph: fx.Graph) -> list[Match]:
    """adaLN matches first (they own their layer norm and modulation), then gated residuals."""
    matches, taken = [], set()

    def claim(m: Match) -> None:
        matches.append(m)
        taken.update(m.expression.nodes)

    for node in graph.nodes:
        eps = plain_layer_norm_eps(node)
        end = modulation_end(node) if eps is not None else None
        if end is not None:
            try:
                claim(Match("adaln", read_expression(end, normalized=node), eps))
            except NotElementwise:
                pass
    for node in graph.nodes:
        if node not in taken and is_gated_residual(node):
            try:
                e = read_expression(node)
            except NotElementwise:
                continue
            if not taken.intersection(e.nodes):
                claim(Match("gated_residual", e))
    return matches


# ------------------------------------------------------------------------------------------ lowering


def lower(match: Match) -> Lowering:
    """The op call for a match; raises ``ValueError`` when the match does not fit any op's contract."""
    e = match.expression
    names = [o.symbol.name for o in e.operands]
    # The op parses the expression from its text; use what it will see.
    expr = expression.parse(expression.to_text(e.expr), names)
    out_dtype = meta.tensor_value(e.root).dtype
    fixed = _fixed_kernel(match, expr)
    if fixed is not None:
        x_node = fixed[1][0]
        if meta.tensor_value(x_node).dtype != out_dtype:
            # The fixed kernels return x's dtype; eager promoted to another one here.
            fixed = None
    if fixed is not None:
        name, args = fixed
        return Lowering(name, getattr(torch.ops.ditfx, name).default, args, kernel_file_source(name))

    kinds = e.kinds()
    values = [meta.tensor_value(o.node) for o in e.operands]
    dtypes = {o.symbol.name: v.dtype for o, v in zip(e.operands, values)}
    promoted = result_dtype(values)
    if promoted != out_dtype:
        raise ValueError(f"the kernel would return {promoted}, eager gives {out_dtype}")
    try:
        codegen.to_triton(expr)
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    template = codegen.LAYER_NORM_ELEMENTWISE if match.eps is not None else codegen.ELEMENTWISE
    name = codegen.kernel_name(template, expr, kinds, dtypes, out_dtype)
    source = codegen.render(expr, kinds, dtypes, out_dtype, template)
    args = (expression.to_text(expr), format_spec(kinds), [o.node for o in e.operands], match.eps)
    return Lowering(name, torch.ops.ditfx.fused_elementwise.default, args, source)


def kernel_file_source(name: str) -> str:
    """The Triton source of the fixed kernel ``torch.ops.ditfx.<name>``."""
    return (_KERNELS_DIR / name / "triton_kernel.py").read_text()


def _fixed_kernel(match: Match, expr: sympy.Expr) -> tuple[str, tuple] | None:
    """``(op name, args)`` when the expression is exactly a fixed kernel's formula."""
    e = match.expression
    mods = [o for o in e.operands if o.kind in ("per_sample", "full") and o is not e.normalized]
    if match.pattern == "adaln":
        x = e.normalized.symbol
        for scale in mods:
            for shift in mods:
                if scale is not shift and expr == x * (1 + scale.symbol) + shift.symbol:
                    return "adaln_modulate", (e.normalized.node, shift.node, scale.node, match.eps)
        return None
    full = [o for o in e.operands if o.kind == "full"]
    for x in full:
        for y in full:
            for gate in mods:
                if len({id(x), id(y), id(gate)}) == 3 and expr == x.symbol + gate.symbol * y.symbol:
                    return "gated_residual", (x.node, gate.node, y.node)
    return None


def apply(graph: fx.Graph, match: Match, lowering: Lowering, replaced: dict[fx.Node, fx.Node]) -> None:
    """Replace the match's nodes by one call.

    Matches are found before any is applied, so an operand may be the root of a match already
    replaced: ``replaced`` maps such roots to their calls (and gets this match's root).
    """
    e = match.expression
    args = fx.node.map_arg(lowering.args, lambda n: replaced.get(n, n))
    with graph.inserting_before(e.root):
        call = graph.call_function(lowering.op, args)
    # Keep what later passes and inspection read: the example value and the module stack.
    call.meta = {k: v for k, v in e.root.meta.items()
                 if k in ("example_value", "val", "tensor_meta", "nn_module_stack", "stack_trace")}
    e.root.replace_all_uses_with(call)
    for node in reversed(e.nodes):
        graph.erase_node(node)
    replaced[e.root] = call


def fuse_graph(gm: fx.GraphModule, report: FusionReport, region: str = "graph") -> fx.GraphModule:
    """A copy of ``gm`` (a Dynamo graph with example values) with every fitting match lowered.

    Sites and the matches left alone are recorded in ``report`` under ``region``.
    """
    gm = copy.deepcopy(gm)
    replaced: dict[fx.Node, fx.Node] = {}
    for match in find_matches(gm.graph):
        try:
            lowering = lower(match)
        except ValueError as err:
            report.not_lowered.setdefault(region, []).append(
                f"{match.pattern} at {match.expression.root.name}: {err}")
            continue
        nodes = [n.name for n in match.expression.nodes]
        apply(gm.graph, match, lowering, replaced)
        report.sources[lowering.kernel] = lowering.source
        report.sites.setdefault(region, []).append(FusionSite(
            pattern=match.pattern, nodes=nodes, kernel=lowering.kernel,
            expression=expression.to_text(match.expression.expr),
            source_hash=hashlib.sha256(lowering.source.encode()).hexdigest()[:20],
        ))
    gm.graph.lint()
    gm.recompile()
    return gm


def fuse_region(rm: RegionModule, report: FusionReport) -> RegionModule:
    """The region with its matches lowered, and its new signature."""
    gm = fuse_graph(rm.gm, report, rm.region.name)
    # The signature changes with the graph; blocks rewritten alike still share one artifact.
    return RegionModule.of_graph(rm.region, gm)


def fusion_pass(region_modules: list[RegionModule]) -> tuple[list[RegionModule], FusionReport]:
    """Lower the adaLN and gated-residual patterns of every region to ``torch.ops.ditfx`` kernels."""
    report = FusionReport()
    return [fuse_region(rm, report) for rm in region_modules], report


def _kind(a, shape: tuple) -> str | None:
    v = meta.tensor_value(a) if isinstance(a, fx.Node) else None
    return operand_kind(v, shape) if v is not None else None
