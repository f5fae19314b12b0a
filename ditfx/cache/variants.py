"""Block caching's graph variants (its pass): every cacheable block region gets variants that also return what is
cached.

Pattern (a block region, weights and conditioning as inputs)::

    x_0 .. x_k, w..  ->  [block]  ->  y_0 .. y_m          with  y_j = x_{s(j)} + residual_j

becomes

    "residual":  x.., w..        ->  y.., c_0 .. c_m      c_j = y_j - x_{s(j)}   (mode "output": c_j = y_j)
    "probe":     x.., w.., ref   ->  y.., c.., num, den   num_b = sum|c_p - ref|_b,  den_b = sum|ref|_b  (float32)

where p is the primary (latent) stream and b a sample: the change metric of dynamic caching is computed in the
same compiled region as the block, with no extra pass over memory. A skipped block is never run: the runtime
adds the cached ``c`` to the block's current inputs (or returns ``c`` in output mode).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ditfx.cache.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.graph import meta
from ditfx.graph.regions import RegionModule
from ditfx.graph.structure import DiTStructure
from ditfx.plan import Plan, Transform
from ditfx.report import PassReport
from ditfx.technique import PassContext

# the variants the cache policies run (declared here, once)
RESIDUAL, PROBE = "cache.residual", "cache.probe"


@dataclass
class BlockCacheReport(PassReport):
    """What the pass did: which blocks can be cached, and why the others cannot."""

    pass_name = "block_cache"

    mode: str
    cacheable: list[str] = field(default_factory=list)
    not_cacheable: dict[str, str] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"block_cache ({self.mode}): {len(self.cacheable)} cacheable block(s), variants {self.variants}"
        for name, why in self.not_cacheable.items():
            text += f"\n  {name} not cacheable: {why}"
        return text


def _split_output(g: fx.Graph) -> tuple[fx.Node, list]:
    out = g.find_nodes(op="output")[0]
    return out, list(out.args[0])


def residual_variant(gm: fx.GraphModule, streams: list[tuple[int, int]], mode: str) -> fx.GraphModule:
    """The block, also returning one cached value per stream (``out - in`` or ``out``)."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    inputs = list(g.find_nodes(op="placeholder"))
    out, values = _split_output(g)
    with g.inserting_before(out):
        cached = [
            g.call_function(torch.sub, (values[o], inputs[i])) if mode == "residual" else values[o]
            for o, i in streams
        ]
    for c, (o, _) in zip(cached, streams):
        c.meta.setdefault("example_value", meta.tensor_value(values[o]))  # shape checks of re-batched variants
    out.args = (tuple(values + cached),)
    gm.recompile()
    return gm


def probe_variant(gm: fx.GraphModule, streams: list[tuple[int, int]], primary: int, mode: str) -> fx.GraphModule:
    """The residual variant plus the per-sample L1 change of the primary stream against a reference input."""
    gm = residual_variant(gm, streams, mode)
    g = gm.graph
    out, values = _split_output(g)
    current = values[-len(streams) + primary]
    last_input = list(g.find_nodes(op="placeholder"))[-1]
    with g.inserting_after(last_input):
        ref = g.placeholder("cache_ref")
    ref.meta["example_value"] = meta.tensor_value(current)
    with g.inserting_before(out):
        diff = g.call_function(torch.abs, (g.call_function(torch.sub, (current, ref)),))
        # float32 sums whatever the activations' dtype: a bf16 sum over a latent loses the change.
        num = g.call_function(torch.sum, (g.call_function(torch.flatten, (diff, 1)), 1), {"dtype": torch.float32})
        ref_abs = g.call_function(torch.abs, (ref,))
        den = g.call_function(torch.sum, (g.call_function(torch.flatten, (ref_abs, 1)), 1), {"dtype": torch.float32})
    out.args = (tuple(values + [num, den]),)
    gm.recompile()
    return gm


def offer_cache_variants(plan: Plan, mode: str, probe: str | None,
                     lower: Callable[[fx.GraphModule, str], fx.GraphModule] | None = None) -> BlockCacheReport:
    """Offer the cache variants on each cacheable block region of ``plan``; ``probe`` names the region whose
    change decides (it also offers ``cache.probe``). ``lower(gm, label)``: a lowering applied to each variant
    when it is built (the cache bookkeeping kernel). Blocks of one structure share one variant graph, as they
    share one compiled artifact."""
    report = BlockCacheReport(mode)

    def residual(rm: RegionModule, gm: fx.GraphModule) -> fx.GraphModule:
        out = residual_variant(gm, rm.region.streams, mode)
        return lower(out, f"{rm.region.name}/residual") if lower else out

    def probing(rm: RegionModule, gm: fx.GraphModule) -> fx.GraphModule:
        out = probe_variant(gm, rm.region.streams, rm.region.primary_stream, mode)
        return lower(out, f"{rm.region.name}/probe") if lower else out

    plan.transforms[RESIDUAL] = Transform(RESIDUAL, residual)
    plan.transforms[PROBE] = Transform(PROBE, probing)
    for rm in plan.regions:
        r = rm.region
        if r.kind != "block":
            continue
        unpaired = [o.name for pos, o in enumerate(r.outputs) if pos not in {s[0] for s in r.streams}]
        if unpaired:
            report.not_cacheable[r.name] = (
                f"output(s) {unpaired} are not a residual update of a block input, so a skipped block could "
                "not produce them"
            )
            continue
        report.cacheable.append(r.name)
        plan.offers.setdefault(r.name, set()).add(RESIDUAL)
        if r.name == probe:
            plan.offers[r.name].add(PROBE)
    report.variants = sorted({v for offered in plan.offers.values() for v in offered if v in (RESIDUAL, PROBE)})
    return report


def probe_region(structure: DiTStructure, cache: DynamicCache) -> str:
    """DynamicCache counts ``first`` and ``last`` along the blocks that carry the latents: a text-only block (a
    caption refiner) neither probes nor is skipped."""
    blocks = structure.latent_blocks
    n = len(blocks)
    if cache.first + cache.last >= n:
        raise ValueError(
            f"DynamicCache(first={cache.first}, last={cache.last}) leaves no middle blocks to skip in a model "
            f"with {n} blocks on the latent stream: use first + last < {n}"
        )
    return f"block.{blocks[cache.first - 1]}"


def offer(plan: Plan, cache: DynamicCache | StaticCache | CacheCalibration, ctx: PassContext) -> BlockCacheReport:
    """Block caching's pass: the probe (DynamicCache) or the schedule's blocks (StaticCache) checked, the cache
    variants offered and built, one per block structure, so the report is complete before the first call."""
    probe = None
    if isinstance(cache, DynamicCache):
        probe = probe_region(plan.structure, cache)
    elif isinstance(cache, StaticCache):
        cache.schedule.check_model(plan.block_names)
    report = offer_cache_variants(plan, cache.mode, probe, ctx.lower)
    if probe is not None and probe not in report.cacheable:
        raise ValueError(f"the probe block {probe} is not cacheable: {report.not_cacheable.get(probe)}; "
                         "choose another DynamicCache.first")
    built: set[tuple] = set()
    for rm in plan.regions:
        for transform in sorted(plan.offers.get(rm.region.name, ())):
            if (rm.signature, transform) not in built and not plan.transforms[transform].after_rows:
                built.add((rm.signature, transform))
                plan.graph(rm, plan.key(rm, (transform,)))
    return report
