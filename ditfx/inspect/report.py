"""``ditfx inspect``: the region map with node counts and FLOPs (numeric, and symbolic in batch and tokens),
what each pass changed, and the per-step plan; as text, JSON or a Graphviz DOT picture."""
from __future__ import annotations

from ditfx.config import Config
from ditfx.graph.capture import capture
from ditfx.inspect.kernels import format_kernels, kernel_section
from ditfx.inspect.symbolic import symbolic_flops
from ditfx.models.zoo import NamedModel
from ditfx.passes.manager import build_plan
from ditfx.runtime.policy import policy_for


def inspect_model(name: str, named: NamedModel, config: Config, steps: int) -> dict:
    gm, example_inputs = capture(named.model, fullgraph=True, call=named)
    plan = build_plan(gm, config, example_inputs=example_inputs)
    described = describe_techniques(plan, config, steps)
    symbolic = symbolic_flops(named)
    regions = []
    for entry in plan.reports[0].regions:
        shared_with = plan.reports[0].shared[entry["signature"]]
        regions.append({**entry, "shares_artifact_with": [n for n in shared_with if n != entry["name"]],
                        "flops_symbolic": symbolic.get(entry["name"]) if isinstance(symbolic, dict) else None})
    report = {
        "model": name,
        "batch": int(named.inputs[named.latents].shape[0]),
        "inputs": {n: plan.structure.roles.role_of(n) for n in plan.structure.roles.tokens
                   + plan.structure.roles.conditions},
        "blocks": [{"index": b.index, "path": b.path, "class": b.cls} for b in plan.structure.blocks],
        "regions": regions,
        "attention_sites": [{"node": n, "region": r} for n, r in plan.structure.attention],
        "symbolic_flops_note": None if isinstance(symbolic, dict) else symbolic,
        "passes": [{"pass": type(r).__name__, "summary": r.summary()} for r in plan.reports],
        "kernels": kernel_section(plan.reports),
        "total_flops": sum(plan.flops.values()),
        "techniques": described,
        "off": dict(plan.unavailable),
        # the block plan and the budget's modes, as the text report and earlier readers of the JSON know them
        "plan": described.get("cache", {"kind": "none", "description": "every block runs at every step"}),
        "budget": described.get("budget") if plan.modes else None,
    }
    return report


def describe_techniques(plan, config: Config, steps: int) -> dict:
    """What each technique the plan runs says it will do over ``steps`` uniform steps (``Policy.describe``)."""
    on = {id(cfg) for cfg in plan.policies}
    return {t.name: policy_for(cfg, plan).describe(steps) for t, cfg in config.techniques() if id(cfg) in on}


def format_text(report: dict) -> str:
    lines = [f"model {report['model']} (batch {report['batch']}): {len(report['blocks'])} blocks, "
             f"{report['total_flops'] / 1e9:.3f} GFLOPs per call"]
    lines.append("inputs: " + ", ".join(f"{k}={v}" for k, v in report["inputs"].items()))
    lines.append("")
    lines.append(f"{'region':<12}{'module':<30}{'nodes':>6}{'in':>5}{'out':>5}{'GFLOPs':>10}  symbolic FLOPs"
                 "  shares compiled artifact with")
    for r in report["regions"]:
        lines.append(f"{r['name']:<12}{(r['module'] or ''):<30}{r['nodes']:>6}{r['inputs']:>5}{r['outputs']:>5}"
                     f"{r['flops'] / 1e9:>10.4f}  {r['flops_symbolic'] or '-'}  "
                     f"{', '.join(r['shares_artifact_with'][:3])}"
                     f"{'...' if len(r['shares_artifact_with']) > 3 else ''}")
    if report["symbolic_flops_note"]:
        lines.append(f"(symbolic FLOPs: {report['symbolic_flops_note']})")
    lines.append("")
    lines.append("passes:")
    lines.extend("  " + p["summary"].replace("\n", "\n  ") for p in report["passes"])
    if report.get("kernels"):
        lines.append("")
        lines.extend(format_kernels(report["kernels"]))
    lines.append("")
    plan = report["plan"]
    lines.append(f"plan ({plan['kind']}):")
    if plan["kind"] == "static":
        lines.append(f"  delta {plan['delta']}: {plan['block_evals']}/{plan['block_evals_uncached']} block "
                     f"evaluations over {plan['steps']} steps (# = computed, . = reused)")
        for path, row in zip(plan["blocks"], plan["compute"]):
            lines.append(f"  {path:<32}" + "".join("#" if v else "." for v in row))
    else:
        lines.append("  " + plan["description"])
    for name, described in report.get("techniques", {}).items():
        if name not in ("cache", "budget"):
            lines.append(f"{name} ({described['kind']}): {described.get('description', '')}")
    for name, why in report.get("off", {}).items():
        lines.append(f"{name}: off for this graph: {why}")
    budget = report.get("budget")
    if budget:
        lines.append("")
        modes = ", ".join(f"{m}: {budget['tokens']['native']} -> {budget['tokens'][m]} tokens, "
                          f"{budget['flops_ratio'][m]:.3f} of the native FLOPs per call" for m in budget["modes"])
        lines.append(f"budget ({modes}): {budget['weak_steps']}/{budget['steps']} steps weak, "
                     f"{budget['flops_fraction']:.3f} of the native FLOPs")
        lines.append("  patch per step: " + " ".join(str(p) if p != "native" else "n" for p in budget["patch"]))
    return "\n".join(lines)


def format_dot(report: dict) -> str:
    """Regions as a chain of boxes, blocks that share a compiled artifact in the same colour."""
    palette = ["#cfe2ff", "#d1e7dd", "#fff3cd", "#f8d7da", "#e2d9f3", "#d3f0f5"]
    colours: dict[str, str] = {}
    lines = ["digraph ditfx {", "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica];"]
    for r in report["regions"]:
        colour = colours.setdefault(r["signature"], palette[len(colours) % len(palette)])
        label = f"{r['name']}\\n{r['module'] or r['kind']}\\n{r['nodes']} nodes, {r['flops'] / 1e6:.2f} MFLOPs"
        lines.append(f'  "{r["name"]}" [label="{label}", fillcolor="{colour}"];')
    for a, b in zip(report["regions"], report["regions"][1:]):
        lines.append(f'  "{a["name"]}" -> "{b["name"]}";')
    lines.append("}")
    return "\n".join(lines)
