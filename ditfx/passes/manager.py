"""The pass manager: analyse a captured graph, split it into regions, run the passes the config asks for, and
return the :class:`~ditfx.plan.Plan` the runtime runs.

The passes run in a fixed order from a table (``PASSES``): kernel lowering first (so the cache variants are
built from the fused regions), then the guidance and block-cache passes, each only when its technique's config
is set. Each returns a :class:`~ditfx.report.PassReport`; the plan keeps them in order.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from ditfx.config import Config
from ditfx.graph import cost, meta, regions
from ditfx.graph.structure import DiTStructure, analyse
from ditfx.passes.block_cache import BlockCacheReport, cache_pass
from ditfx.passes.budget import budget_pass
from ditfx.passes.history import history_pass
from ditfx.passes.context import PassContext
from ditfx.passes.fusion import FusionReport, fusion_pass
from ditfx.passes.guidance import guidance_pass
from ditfx.passes.rebatch import rebatch
from ditfx.plan import IOSpec, Plan
from ditfx.report import PassReport, TechniqueUnavailable
from ditfx.runtime.rows import is_per_row


@dataclass
class RegionReport(PassReport):
    """The region map: what the split produced."""

    pass_name = "regions"

    regions: list[dict]
    hoisted: int
    shared: dict[str, list[str]]  # signature -> regions that share its compiled artifact

    def summary(self) -> str:
        n_blocks = sum(1 for r in self.regions if r["kind"] == "block")
        return (f"regions: {len(self.regions)} ({n_blocks} blocks, {len(self.shared)} distinct compiled "
                f"artifacts), {self.hoisted} conditioning node(s) hoisted out of blocks to the prologue")


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`ditfx.optimize` knows of the model that the graph does not show."""

    null_class: int | None = None  # the class label of the unconditional branch, for class-conditional models
    blocks: tuple[str, ...] = ()  # the model's repeated blocks (module paths), to tell a partial graph


@dataclass(frozen=True)
class Pass:
    """One pass: it runs when its technique's config field is set, registers what it offers in the plan (named
    transforms, the regions that offer them) and returns its report. Its technique's policy joins the chain."""

    name: str
    technique: str  # the Config field that turns it on
    run: Callable[[Plan, PassContext], PassReport]


# in this order; the policies chain in the same order (the budget chooses the mode, guidance the rows, then the
# cache acts on them)
PASSES: list[Pass] = [
    Pass("budget", "budget", budget_pass),
    Pass("history", "history", history_pass),
    Pass("guidance", "guidance", guidance_pass),
    Pass("block_cache", "cache", cache_pass),
]


def build_plan(gm: fx.GraphModule, config: Config, weight_names: set[str] | None = None,
               facts: ModelFacts | None = None, example_inputs: list | None = None) -> Plan:
    """Raises :class:`~ditfx.graph.structure.StructureError` when the graph has no DiT structure.
    ``example_inputs``: the captured call's inputs (the zero-shot token budget reads the weights from them)."""
    facts = facts or ModelFacts()
    structure = analyse(gm, weight_names)
    region_modules = [regions.extract(gm, r) for r in structure.regions]
    ctx = PassContext(config, example_inputs=example_inputs, facts=facts)
    if config.kernels:  # before the cache pass, so its variants are built from the fused regions
        region_modules, ctx.fusion = fusion_pass(region_modules)
    flops = {rm.region.name: int(cost.graph_flops(rm.region.nodes)) for rm in region_modules}
    plan = Plan(structure, io_spec(structure, region_modules), region_modules, flops, rebatch=rebatch,
                null_class=facts.null_class, tokens=_latent_tokens(structure))
    shared: dict[str, list[str]] = {}
    for rm in region_modules:
        shared.setdefault(rm.signature, []).append(rm.region.name)
    plan.reports.append(RegionReport(
        regions=[{"name": rm.region.name, "kind": rm.region.kind, "nodes": len(rm.region.nodes),
                  "inputs": len(rm.region.inputs), "outputs": len(rm.region.outputs),
                  "signature": rm.signature, "flops": flops[rm.region.name],
                  "module": rm.region.block.path if rm.region.block else None}
                 for rm in region_modules],
        hoisted=len(structure.hoisted),
        shared=shared,
    ))
    if structure.inlined.calls:
        plan.reports.append(structure.inlined)
    if ctx.fusion is not None:
        plan.reports.append(ctx.fusion)
    for p in PASSES:
        technique = getattr(config, p.technique)
        if technique is None:
            continue
        try:
            report = p.run(plan, ctx)
        except TechniqueUnavailable as e:
            warnings.warn(f"ditfx: {p.technique} off for this graph: {e}", stacklevel=3)
            continue
        plan.reports.append(report)
        plan.policies.append(technique)
    return plan


def _latent_tokens(structure: DiTStructure) -> int:
    """Tokens per sample on the latent stream: the sequence length of the first latent block's stream input."""
    for r in structure.block_regions:
        if r.latent_stream and r.streams and r.primary_stream is not None:
            v = meta.tensor_value(r.inputs[r.streams[r.primary_stream][1]])
            if v is not None and v.dim() >= 2:
                return int(v.shape[-2])
    return 0


def io_spec(structure: DiTStructure, region_modules: list[regions.RegionModule]) -> IOSpec:
    """The call's interface: inputs and roles, batch-carrying values, the output structure, release lists."""
    gm, roles = structure.gm, structure.roles
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = [p.name for p in placeholders]
    role_of = {p.name: roles.role_of(p.name) for p in placeholders}
    for p in placeholders:  # class labels: the integer per-sample condition (its null class is the uncond one)
        v = meta.tensor_value(p)
        if (role_of[p.name] == "condition" and v is not None and v.dim() == 1 and not v.is_floating_point()
                and "labels" not in role_of.values()):
            role_of[p.name] = "labels"
    latents = meta.tensor_value(next(p for p in placeholders if p.name == roles.latents)) if roles.latents else None
    rows = latents.shape[0] if latents is not None and latents.dim() > 0 else None
    output = gm.graph.find_nodes(op="output")[0].args[0]
    flat: list[fx.Node] = []
    fx.node.map_arg(output, flat.append)
    carrying = _batch_carrying(gm, roles.weights, rows)
    region_inputs = [[n.name for n in rm.region.inputs] for rm in region_modules]
    return IOSpec(
        input_names=names,
        input_roles=role_of,
        rows=rows,
        input_batch=[name in carrying for name in names],
        region_inputs=region_inputs,
        region_outputs=[[n.name for n in rm.region.outputs] for rm in region_modules],
        region_batch=[[i.name in carrying for i in rm.region.inputs] for rm in region_modules],
        release=_release_lists(region_inputs, set(names), {n.name for n in flat}),
        output_names=[n.name for n in flat],
        output_tree=fx.node.map_arg(output, lambda n: n.name),
        output_meta=[(tuple(v.shape), v.dtype, str(v.device)) if (v := meta.tensor_value(n)) is not None else None
                     for n in flat],
    )


def _batch_carrying(gm: fx.GraphModule, weights: list[str], rows: int | None) -> set[str]:
    """Batch-sized tensors computed from the batch-sized non-weight inputs (through any op, tuples included)."""

    def sized(n: fx.Node) -> bool:
        return is_per_row(meta.tensor_value(n), rows)

    derived: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if sized(n) and n.name not in weights:
                derived.add(n.name)
        elif any(a.name in derived for a in n.all_input_nodes):
            derived.add(n.name)
    return {n.name for n in gm.graph.nodes if n.name in derived and sized(n)}


def _release_lists(region_inputs: list[list[str]], placeholders: set[str], kept: set[str]) -> list[list[str]]:
    """Values no later region reads are dropped after their last reader, so memory stays flat."""
    last: dict[str, int] = {}
    for k, names in enumerate(region_inputs):
        for name in names:
            last[name] = k
    release: list[list[str]] = [[] for _ in region_inputs]
    for name, k in last.items():
        if name not in kept and name not in placeholders:
            release[k].append(name)
    return release


__all__ = ["ModelFacts", "Plan", "RegionReport", "BlockCacheReport", "FusionReport", "build_plan", "io_spec"]
