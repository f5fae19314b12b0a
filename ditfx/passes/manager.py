"""The pass manager: analyse a captured graph, split it into regions, run the passes of the techniques the config
turns on, and return the :class:`~ditfx.plan.Plan` the runtime runs.

Kernel lowering runs first (``Config(kernels=True)``, so the techniques' variants are built from the fused
regions), then each technique the config turns on, in the order its policy chains (``Technique.order``): the
policy's requirements are checked against the graph, then its pass (``Technique.offer``) registers its variants.
A technique that cannot apply to the graph (a missing input, a model it cannot convert) is off for this graph with
a warning; the others stay on. Each pass returns a :class:`~ditfx.report.PassReport`; the plan keeps them in order.
A pass that rewrites the graph into another mode of the model (a token budget's coarse patch) has it planned here
too (``PassContext.plan_graph``), with every other technique of the config.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch.fx as fx

from ditfx.config import Config
from ditfx.graph import cost, meta, regions
from ditfx.graph.rebatch import rebatch
from ditfx.graph.structure import DiTStructure, analyse
from ditfx.kernels.lowering.cache_bookkeeping import fuse_bookkeeping
from ditfx.kernels.lowering.fusion import fusion_pass
from ditfx.model_facts import ModelFacts
from ditfx.plan import IOSpec, Plan
from ditfx.report import PassReport, TechniqueUnavailable
from ditfx.runtime.policy import policy_class
from ditfx.technique import PassContext, Technique


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


def build_plan(gm: fx.GraphModule, config: Config, weight_names: set[str] | None = None,
               facts: ModelFacts | None = None, example_inputs: list | None = None) -> Plan:
    """Raises :class:`~ditfx.graph.structure.StructureError` when the graph has no DiT structure.
    ``example_inputs``: the captured call's inputs (the zero-shot token budget reads the weights from them)."""
    facts = facts or ModelFacts()
    structure = analyse(gm, weight_names)
    region_modules = [regions.extract(gm, r) for r in structure.regions]
    fusion = None
    if config.kernels:  # before the techniques' passes, so their variants are built from the fused regions
        region_modules, fusion = fusion_pass(region_modules)
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
    if fusion is not None:
        plan.reports.append(fusion)
    lower = functools.partial(_lower_variant, report=fusion) if fusion is not None else None
    for technique, cfg in config.techniques():
        ctx = PassContext(example_inputs=example_inputs, facts=facts, lower=lower,
                          plan_graph=functools.partial(_plan_mode, config=config, without=technique, facts=facts))
        try:
            _check_requirements(plan, cfg)
            report = technique.offer(plan, cfg, ctx)
        except TechniqueUnavailable as e:
            plan.unavailable[technique.name] = str(e)
            warnings.warn(f"ditfx: {technique.name} off for this graph: {e}", stacklevel=3)
            continue
        plan.reports.append(report)
        plan.policies.append(cfg)
    return plan


def _check_requirements(plan: Plan, cfg) -> None:
    """The call inputs the technique's policy needs (``Policy.requires``) are inputs of this graph."""
    for role, why in policy_class(cfg).requires.items():
        if plan.io.position(role) is None:
            raise TechniqueUnavailable(f"{type(cfg).__name__} needs the denoiser's {role} input {why}, and this graph "
                                       "has none that ditfx recognises")


def _plan_mode(gm: fx.GraphModule, weight_names: set[str], config: Config, without: Technique,
               facts: ModelFacts) -> Plan:
    """Another mode of the model (a graph a pass rewrote), planned with every other technique of the config."""
    return build_plan(gm, dataclasses.replace(config, **{without.name: None}), weight_names=weight_names,
                      facts=facts)


def _lower_variant(gm: fx.GraphModule, label: str, report) -> fx.GraphModule:
    """Kernel lowering of a variant a pass builds: the cache bookkeeping (the regions were lowered already)."""
    return fuse_bookkeeping(gm, report, label)


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
        return meta.is_per_row(meta.tensor_value(n), rows)

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


__all__ = ["RegionReport", "build_plan", "io_spec"]
