"""The pass manager: analyse a captured graph, split it into regions, run the configured passes, make a Plan."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ditfx.config import Config, DynamicCache, StaticCache
from ditfx.graph import cost, regions
from ditfx.graph.structure import DiTStructure, analyse
from ditfx.passes.block_cache import BlockCacheReport, block_cache_pass
from ditfx.passes.cache_bookkeeping import fuse_cache_variants
from ditfx.passes.fusion import FusionReport, fusion_pass


@dataclass
class RegionReport:
    """The region map: what the split produced."""

    regions: list[dict]
    hoisted: int
    shared: dict[str, list[str]]  # signature -> regions that share its compiled artifact

    def summary(self) -> str:
        n_blocks = sum(1 for r in self.regions if r["kind"] == "block")
        return (f"regions: {len(self.regions)} ({n_blocks} blocks, {len(self.shared)} distinct compiled "
                f"artifacts), {self.hoisted} conditioning node(s) hoisted out of blocks to the prologue")


@dataclass
class Plan:
    """Everything the runtime needs: regions in order, their variants, costs, and what each pass did."""

    structure: DiTStructure
    regions: list[regions.RegionModule]
    variants: dict[str, dict[str, fx.GraphModule]] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    reports: list = field(default_factory=list)

    @property
    def block_names(self) -> list[str]:
        return [b.path for b in self.structure.blocks]

    @property
    def cacheable_blocks(self) -> list[int]:
        """Indices of the blocks the cache pass gave variants (the others always run)."""
        return sorted(rm.region.block.index for rm in self.regions if rm.region.name in self.variants)


def probe_region(structure: DiTStructure, cache: DynamicCache) -> str:
    n = len(structure.blocks)
    if cache.first + cache.last >= n:
        raise ValueError(
            f"DynamicCache(first={cache.first}, last={cache.last}) leaves no middle blocks to skip in a model "
            f"with {n} blocks: use first + last < {n}"
        )
    return f"block.{cache.first - 1}"


def build_plan(gm: fx.GraphModule, config: Config, weight_names: set[str] | None = None) -> Plan:
    """Raises :class:`~ditfx.graph.structure.StructureError` when the graph has no DiT structure."""
    structure = analyse(gm, weight_names)
    region_modules = [regions.extract(gm, r) for r in structure.regions]
    fusion = None
    if config.kernels:  # before the cache pass, so its variants are built from the fused regions
        region_modules, fusion = fusion_pass(region_modules)
    plan = Plan(structure, region_modules)
    plan.flops = {rm.region.name: int(cost.graph_flops(rm.region.nodes)) for rm in region_modules}
    shared: dict[str, list[str]] = {}
    for rm in region_modules:
        shared.setdefault(rm.signature, []).append(rm.region.name)
    plan.reports.append(RegionReport(
        regions=[{"name": rm.region.name, "kind": rm.region.kind, "nodes": len(rm.region.nodes),
                  "inputs": len(rm.region.inputs), "outputs": len(rm.region.outputs),
                  "signature": rm.signature, "flops": plan.flops[rm.region.name],
                  "module": rm.region.block.path if rm.region.block else None}
                 for rm in region_modules],
        hoisted=len(structure.hoisted),
        shared=shared,
    ))
    if structure.inlined.calls:
        plan.reports.append(structure.inlined)
    if fusion is not None:
        plan.reports.append(fusion)
    cache = config.cache
    if cache is not None:
        probe = None
        if isinstance(cache, DynamicCache):
            probe = probe_region(structure, cache)
        elif isinstance(cache, StaticCache):
            cache.schedule.check_model(plan.block_names)
        plan.variants, report = block_cache_pass(region_modules, cache.mode, probe)
        if fusion is not None:  # the probe's residual and change sums: one pass over memory
            fuse_cache_variants(plan.variants, fusion)
        if probe is not None and probe not in report.cacheable:
            raise ValueError(f"the probe block {probe} is not cacheable: {report.not_cacheable.get(probe)}; "
                             "choose another DynamicCache.first")
        plan.reports.append(report)
    return plan


__all__ = ["Plan", "RegionReport", "BlockCacheReport", "FusionReport", "build_plan"]
