"""Kernel lowering of the variants the passes build (``Config(kernels=True)``): the block-cache bookkeeping, the
probe variant's residual and change sums, becomes one op.

Pattern (what :func:`ditfx.cache.variants.probe_variant` adds to the probe block; out, inp, ref ``(B, ...)``)::

    residual = out - inp
    num = sum(flatten(abs(residual - ref), 1), 1, dtype=float32)
    den = sum(flatten(abs(ref), 1), 1, dtype=float32)

        ->  residual, num, den = ditfx.cache_residual(out, inp, ref)

Unfused, the bookkeeping reads ``out``, ``inp`` and ``ref`` and the residual again after writing it (Inductor can
fuse the sub and the two reductions when it sees them, but not once ``out`` comes from an opaque ``ditfx`` op such
as ``gated_residual``). The op reads each input once and writes the residual and per-chunk partial sums. The
residual keeps its other uses (it is the value the cache stores). Runs after the block-cache pass, on its variants.
"""
from __future__ import annotations

import copy
import hashlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.elementwise import KERNEL_DTYPES, arithmetic
from ditfx.kernels.lowering.fusion import FusionReport, FusionSite, kernel_file_source

KERNEL = "cache_residual"
EXPRESSION = "r = out - inp; num = sum|r - ref|; den = sum|ref|"


@dataclass
class BookkeepingMatch:
    """The probe's bookkeeping: the residual ``out - inp``, its L1 sums against ``ref``, and the nodes they replace."""

    out: fx.Node
    inp: fx.Node
    ref: fx.Node
    residual: fx.Node
    num: fx.Node
    den: fx.Node
    nodes: list[fx.Node]  # erased: the difference, the |.|s, the flattens (num, den, residual are replaced)


def _is_call(node: fx.Node, name: str) -> bool:
    """``torch.<name>(...)`` or ``tensor.<name>(...)``."""
    return (node.op == "call_function" and node.target is getattr(torch, name)) or (
        node.op == "call_method" and node.target == name)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _per_sample_l1(value: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The node ``sum(flatten(abs(value), 1), 1, dtype=float32)`` among value's users, with its |.| and flatten."""
    for a in value.users:
        if not (_is_call(a, "abs") and len(a.args) == 1):
            continue
        flat = _only_user(a)
        if flat is None or not (_is_call(flat, "flatten") and flat.args[1:] == (1,)):
            continue
        total = _only_user(flat)
        if total is not None and _is_call(total, "sum") and total.args[1:] == (1,) and (
                total.kwargs == {"dtype": torch.float32}):
            return total, [a, flat]
    return None


def find_bookkeeping(graph: fx.Graph) -> list[BookkeepingMatch]:
    """Every ``sum|(out - inp) - ref|`` with its ``sum|ref|`` in ``graph``."""
    matches = []
    for diff in graph.nodes:
        if arithmetic(diff) is not operator.sub or len(diff.users) != 1:
            continue
        residual, ref = diff.args
        if not (isinstance(residual, fx.Node) and isinstance(ref, fx.Node) and arithmetic(residual) is operator.sub):
            continue
        out, inp = residual.args
        num, den = _per_sample_l1(diff), _per_sample_l1(ref)
        if isinstance(out, fx.Node) and isinstance(inp, fx.Node) and num is not None and den is not None:
            matches.append(BookkeepingMatch(out, inp, ref, residual, num[0], den[0], [diff, *num[1], *den[1]]))
    return matches


def unfit(match: BookkeepingMatch, order: dict[fx.Node, int]) -> str | None:
    """Why the op would not reproduce the match (shapes, dtypes, a reference computed late), or None."""
    if order[match.ref] > order[match.residual]:
        return "the reference is computed after the residual"
    values = [meta.tensor_value(n) for n in (match.out, match.inp, match.ref, match.residual)]
    if any(v is None for v in values):
        return "a value has no example tensor"
    if len({tuple(v.shape) for v in values}) != 1 or values[0].dim() < 2:
        return f"out, inp, ref and the residual must have one (B, ...) shape, got {[tuple(v.shape) for v in values]}"
    if len({v.dtype for v in values}) != 1 or values[0].dtype not in KERNEL_DTYPES:
        return f"out, inp, ref must share a dtype of {KERNEL_DTYPES}, got {[v.dtype for v in values]}"
    return None


def apply(graph: fx.Graph, match: BookkeepingMatch) -> None:
    """``residual, num, den = ditfx.cache_residual(out, inp, ref)`` in place of the match."""
    with graph.inserting_before(match.residual):
        call = graph.call_function(torch.ops.ditfx.cache_residual.default, (match.out, match.inp, match.ref))
        parts = [graph.call_function(operator.getitem, (call, i)) for i in range(3)]
    replaced = (match.residual, match.num, match.den)
    call.meta["example_value"] = tuple(meta.tensor_value(n) for n in replaced)
    for old, new in zip(replaced, parts):
        new.meta["example_value"] = meta.tensor_value(old)
        old.replace_all_uses_with(new)
    for node in [match.num, match.den, *reversed(match.nodes), match.residual]:
        graph.erase_node(node)


def fuse_bookkeeping(gm: fx.GraphModule, report: FusionReport, region: str) -> fx.GraphModule:
    """Lower ``gm``'s bookkeeping to ``ditfx.cache_residual`` in place (the cache variants are the pass's own
    copies); returns ``gm``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lowered = False
    for match in find_bookkeeping(gm.graph):
        why = unfit(match, order)
        if why is not None:
            report.not_lowered.setdefault(region, []).append(f"cache bookkeeping at {match.num.name}: {why}")
            continue
        nodes = [n.name for n in (match.residual, *match.nodes, match.num, match.den)]
        apply(gm.graph, match)
        source = report.sources[KERNEL] = kernel_file_source(KERNEL)
        report.sites.setdefault(region, []).append(FusionSite(
            pattern="cache_bookkeeping", nodes=nodes, kernel=KERNEL, expression=EXPRESSION,
            source_hash=hashlib.sha256(source.encode()).hexdigest()[:20],
        ))
        lowered = True
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return gm


def fuse_cache_variants(variants: dict[str, dict[str, fx.GraphModule]], report: FusionReport) -> None:
    """Lower the bookkeeping of the block-cache pass's variants in place; sites go to ``report`` as
    ``"<region>/<variant>"``. A variant that several blocks share is lowered once and reported for each."""
    first_label: dict[int, str] = {}
    for region, by_name in variants.items():
        for name, gm in by_name.items():
            label = f"{region}/{name}"
            first = first_label.setdefault(id(gm), label)
            if first == label:
                fuse_bookkeeping(gm, report, label)
                continue
            for found in (report.sites, report.not_lowered):
                if first in found:
                    found[label] = copy.deepcopy(found[first])
