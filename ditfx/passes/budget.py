"""The token-budget pass: the weak (coarse-patch) mode of the captured model, as a plan of its own.

From the captured graph it builds the graph at the adapter's patch size (:mod:`ditfx.budget.weak`), checks the
adapter's tensors against what that graph takes (or computes the zero-shot ones from the model's weights), and
plans the weak graph with the same config minus the budget, so caching, guidance and kernels apply in both modes.
The weak plan's blocks share one compiled artifact per structure, as the native ones do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ditfx.budget.weak import BudgetConversionError, find_sites, weak_graph, zero_shot_tensors
from ditfx.graph.structure import StructureError
from ditfx.passes.context import PassContext
from ditfx.plan import Plan
from ditfx.report import PassReport


@dataclass
class BudgetReport(PassReport):
    """The weak mode the pass built."""

    pass_name = "budget"

    mode: str
    native_patch: int
    patch: int
    tokens: tuple[int, int]  # native, weak (per sample)
    flops_ratio: float  # weak call / native call, cost model
    zero_shot: bool
    lora_rank: int
    pos_table: bool

    def summary(self) -> str:
        kind = "zero-shot (PI-resize)" if self.zero_shot else f"adapter (LoRA rank {self.lora_rank})"
        return (f"budget: weak mode {self.mode} at patch {self.patch} (native {self.native_patch}), "
                f"{self.tokens[0]} -> {self.tokens[1]} tokens, {self.flops_ratio:.3f} of the native FLOPs per call, "
                f"{kind}")


def budget_pass(plan: Plan, ctx: PassContext) -> BudgetReport:
    from ditfx.passes.manager import build_plan  # the weak graph is planned like any captured graph

    cfg = ctx.config.budget
    gm, structure = plan.structure.gm, plan.structure
    sites = find_sites(gm, structure.roles, ctx.example_inputs)
    adapter = cfg.adapter
    patch = adapter.patch if adapter is not None else (cfg.patch_size or 2 * sites.patch)
    if adapter is not None and adapter.native_patch != sites.patch:
        raise ValueError(f"the budget adapter was made for native patch size {adapter.native_patch}, this model's is "
                         f"{sites.patch}")
    weak = weak_graph(gm, sites, patch, adapter.lora_rank if adapter is not None else 0)
    if adapter is not None:
        adapter.check(weak.shapes)
        tensors = adapter.tensors
    else:
        if ctx.example_inputs is None:
            raise ValueError("the zero-shot weak mode needs the model's weights: pass a TokenBudget adapter")
        tensors = zero_shot_tensors(gm, sites, ctx.example_inputs, patch, cfg.resize)
    ref = next(v for ph, v in zip(gm.graph.find_nodes(op="placeholder"), ctx.example_inputs or [])
               if ph.name == sites.embed_weight) if ctx.example_inputs else None
    inputs = [tensors[k].to(device=ref.device, dtype=ref.dtype) if ref is not None else tensors[k]
              for k in weak.keys]
    sub_config = dataclasses.replace(ctx.config, budget=None)
    try:
        sub = build_plan(weak.gm, sub_config, weight_names=set(weak.placeholders), facts=ctx.facts)
    except StructureError as e:
        raise BudgetConversionError(f"the graph at patch size {patch} has no DiT structure ditfx can split: {e}") from e
    name = f"p{patch}"
    plan.modes[name] = sub
    plan.mode_inputs[name] = inputs
    ratio = sum(sub.flops.values()) / max(1, sum(plan.flops.values()))
    return BudgetReport(mode=name, native_patch=sites.patch, patch=patch, tokens=(plan.tokens, sub.tokens),
                        flops_ratio=ratio, zero_shot=adapter is None, lora_rank=weak.lora_rank,
                        pos_table=sites.pos_operand is not None)
