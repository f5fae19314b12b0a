"""Token budgets' graph variants (their pass): the weak (coarse-patch) mode of the captured model, as a mode of
the plan.

From the captured graph it builds the graph at the adapter's patch size (:mod:`ditfx.budget.weak`), checks the
adapter's tensors against what that graph takes (or computes the zero-shot ones from the model's weights), and
has the pass manager plan the weak graph with every other technique of the config (``ctx.plan_graph``), so
caching, guidance and kernels apply in both modes. The weak plan's blocks share one compiled artifact per
structure, as the native ones do.
"""
from __future__ import annotations

from dataclasses import dataclass

from ditfx.budget.adapter import AdapterError
from ditfx.budget.config import TokenBudget
from ditfx.budget.weak import BudgetConversionError, adapter_shapes, merge_lora, weak_graph, zero_shot_tensors
from ditfx.graph.sites import find_sites
from ditfx.graph.structure import StructureError
from ditfx.plan import ModeKey, Plan
from ditfx.report import PassReport
from ditfx.technique import PassContext


def mode_key(patch: int) -> ModeKey:
    """The weak mode at patch size ``patch``."""
    return ModeKey("budget", patch, f"p{patch}")


@dataclass
class BudgetReport(PassReport):
    """The weak mode the pass built."""

    pass_name = "budget"

    modes: list[str]  # coarsest first
    native_patch: int
    patches: list[int]
    tokens: list[int]  # per sample: native, then each mode
    flops_ratio: list[float]  # a call of each mode / a native call, cost model
    zero_shot: list[bool]
    lora_rank: list[int]
    pos_table: bool

    def summary(self) -> str:
        lines = []
        for k, mode in enumerate(self.modes):
            kind = "zero-shot (PI-resize)" if self.zero_shot[k] else f"adapter (LoRA rank {self.lora_rank[k]})"
            lines.append(f"budget: weak mode {mode} at patch {self.patches[k]} (native {self.native_patch}), "
                         f"{self.tokens[0]} -> {self.tokens[k + 1]} tokens, {self.flops_ratio[k]:.3f} of the native "
                         f"FLOPs per call, {kind}")
        return "\n".join(lines)


def offer(plan: Plan, cfg: TokenBudget, ctx: PassContext) -> BudgetReport:
    """Token budgets' pass: one mode of the plan per level of ``cfg``, coarsest first as the config lists them."""
    gm, structure = plan.structure.gm, plan.structure
    sites = find_sites(gm, structure.roles, ctx.example_inputs)
    ref = next((v for ph, v in zip(gm.graph.find_nodes(op="placeholder"), ctx.example_inputs or [])
                if ph.name == sites.embed_weight), None)
    built = []
    for patch, adapter, _ in cfg.levels():
        patch = patch or 2 * sites.patch
        if adapter is not None and adapter.native_patch != sites.patch:
            raise AdapterError(f"the budget adapter was made for native patch size {adapter.native_patch}, this "
                               f"model's is {sites.patch}")
        rank = adapter.lora_rank if adapter is not None else 0
        merged = bool(rank) and cfg.merge_lora and ctx.example_inputs is not None
        weak = weak_graph(gm, sites, patch, rank, merged)
        if adapter is not None:
            adapter.check(adapter_shapes(sites, patch, rank, gm))
            tensors = merge_lora(gm, sites, ctx.example_inputs, adapter.tensors) if merged else adapter.tensors
        elif ctx.example_inputs is None:
            raise BudgetConversionError("the zero-shot weak mode needs the model's weights: pass a TokenBudget "
                                        "adapter")
        else:
            tensors = zero_shot_tensors(gm, sites, ctx.example_inputs, patch, cfg.resize)
        try:
            sub = ctx.plan_graph(weak.gm, set(weak.placeholders))
        except StructureError as e:
            raise BudgetConversionError(f"the graph at patch size {patch} has no DiT structure ditfx can split: "
                                        f"{e}") from e
        inputs = [tensors[k].to(device=ref.device, dtype=ref.dtype) if ref is not None else tensors[k]
                  for k in weak.keys]
        built.append((mode_key(patch), sub, inputs, adapter, weak.lora_rank, patch))
    for key, sub, inputs, *_ in built:  # the plan changes only once every level converted
        plan.modes[key] = sub
        plan.mode_inputs[key] = inputs
    total = max(1, sum(plan.flops.values()))
    return BudgetReport(modes=[key.name for key, *_ in built], native_patch=sites.patch,
                        patches=[patch for *_, patch in built],
                        tokens=[plan.tokens] + [sub.tokens for _, sub, *_ in built],
                        flops_ratio=[sum(sub.flops.values()) / total for _, sub, *_ in built],
                        zero_shot=[a is None for *_, a, _, _ in built], lora_rank=[r for *_, r, _ in built],
                        pos_table=sites.pos_operand is not None)
