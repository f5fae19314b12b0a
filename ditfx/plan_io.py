"""A Plan on disk: ``plan.json`` (format, IO spec, regions, transforms offered, policy configs, modes) beside one
``torch.export`` program per graph of the variant table (``graphs/<n>.pt2``), the configs' own files (a cache
schedule, LinearAG coefficients) and each mode's plan (``modes/<name>/``, with the inputs its graphs take).

A loaded plan runs the graphs it was saved with, exactly: the base graph of every region structure and each
variant built before saving (run a generation first to include the row subsets it used). It cannot build new
variants (the transforms work on the captured Torch IR, which export lowers to ATen): a key it lacks is
unavailable, and the runtime then computes every row or refuses the policy, as for any unavailable variant.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from ditfx.config import Config
from ditfx.config_io import config_classes, technique_from_json, technique_to_json
from ditfx.graph import meta
from ditfx.graph.regions import RegionModule
from ditfx.graph.structure import Block, DiTStructure, InputRoles, Region
from ditfx.plan import IOSpec, ModeKey, Plan, Transform, VariantKey, VariantUnavailable

FORMAT = "ditfx.plan/2"
READS = ("ditfx.plan/1", FORMAT)  # /1 (before 2026-12): modes by name only, no "compiled" flag on transforms


# ------------------------------------------------------------------------------------------ saving
def save_plan(plan: Plan, directory: str | Path) -> Path:
    directory = Path(directory)
    (directory / "graphs").mkdir(parents=True, exist_ok=True)
    for rm in plan.regions:  # every structure's base graph is part of the plan
        plan.graph(rm, plan.key(rm))
    graphs = []
    for n, (key, gm) in enumerate(plan.built().items()):
        name = f"graphs/{n}.pt2"
        torch.export.save(_export(gm), directory / name)
        graphs.append({"file": name, "signature": key.signature, "transforms": list(key.transforms),
                       "rows": key.rows})
    data = plan_to_json(plan, directory)
    data["graphs"] = graphs
    for key, sub in plan.modes.items():  # each mode is a plan of its own, with the inputs its graphs take
        save_plan(sub, directory / "modes" / key.name)
    (directory / "plan.json").write_text(json.dumps(data, indent=1))
    return directory


def plan_to_json(plan: Plan, directory: Path) -> dict:
    """The plan as JSON, without its graphs; the policies' files and each mode's inputs are written to
    ``directory`` (a mode's own plan goes to ``directory/modes/<name>``, which the caller writes)."""
    data = {
        "format": FORMAT,
        "torch": torch.__version__,
        "io": _io_to_json(plan.io),
        "blocks": [dataclasses.asdict(b) for b in plan.structure.blocks],
        "regions": [_region_to_json(rm) for rm in plan.regions],
        "flops": plan.flops,
        "transforms": {name: {"after_rows": t.after_rows, "compiled": t.compiled}
                       for name, t in plan.transforms.items()},
        "offers": {name: sorted(offered) for name, offered in plan.offers.items()},
        "policies": [technique_to_json(c, directory, f"policy{k}") for k, c in enumerate(plan.policies)],
        "unavailable": plan.unavailable,
        "null_class": plan.null_class,
        "tokens": plan.tokens,
        "modes": [dataclasses.asdict(key) for key in plan.modes],
    }
    for key in plan.modes:
        (directory / "modes" / key.name).mkdir(parents=True, exist_ok=True)
        save_file({str(i): t.detach().contiguous().cpu() for i, t in enumerate(plan.mode_inputs[key])},
                  str(directory / "modes" / key.name / "inputs.safetensors"))
    return data


def _export(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    """The graph as an exported program, traced on zeros shaped like its captured inputs."""
    args = []
    for p in gm.graph.find_nodes(op="placeholder"):
        v = meta.tensor_value(p)
        args.append(torch.zeros(v.shape, dtype=v.dtype, device=v.device) if v is not None else meta.value(p))

    class Graph(torch.nn.Module):
        def __init__(self, graph):
            super().__init__()
            self.graph_module = graph

        def forward(self, *inputs):
            return self.graph_module(*inputs)

    with torch.no_grad():
        return torch.export.export(Graph(gm), tuple(args), strict=False)


def _io_to_json(io: IOSpec) -> dict:
    data = dataclasses.asdict(io)
    data["output_tree"] = _tree_to_json(io.output_tree)
    data["output_meta"] = [None if m is None else {"shape": list(m[0]), "dtype": str(m[1]).removeprefix("torch."),
                                                   "device": m[2]} for m in io.output_meta]
    return data


def _tree_to_json(tree):
    if isinstance(tree, (tuple, list)):
        return {type(tree).__name__: [_tree_to_json(t) for t in tree]}
    if isinstance(tree, dict):
        return {"dict": {k: _tree_to_json(v) for k, v in tree.items()}}
    return tree


def _region_to_json(rm: RegionModule) -> dict:
    r = rm.region
    return {"name": r.name, "kind": r.kind, "signature": rm.signature, "block": r.block.index if r.block else None,
            "outputs": len(r.outputs), "streams": [list(s) for s in r.streams], "primary_stream": r.primary_stream,
            "latent_stream": r.latent_stream}


# ----------------------------------------------------------------------------------------- loading
def load_plan(directory: str | Path, config_class: type = Config) -> Plan:
    """A plan written by :func:`save_plan`; it runs the graphs it was saved with. Its policy configs are read
    among the techniques ``config_class`` registers."""
    directory = Path(directory)
    data = read_plan_json(directory)
    graphs = {}
    for entry in data["graphs"]:
        key = VariantKey(entry["signature"], tuple(entry["transforms"]), entry["rows"])
        graphs[key] = torch.export.load(directory / entry["file"]).module()
    plan = plan_from_json(data, directory, lambda key: graphs[key], lambda d: load_plan(d, config_class),
                          config_class=config_class)
    plan._graphs.update(graphs)
    return plan


def read_plan_json(directory: Path) -> dict:
    path = directory / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"no plan at {directory} (plan.json missing): write one with ditfx.plan_io.save_plan")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}): write the plan again") from None
    if not isinstance(data, dict) or data.get("format") not in READS:
        raise ValueError(f"{path} is not a ditfx plan ({' or '.join(READS)}); got format "
                         f"{data.get('format') if isinstance(data, dict) else None!r}")
    return data


def plan_from_json(data: dict, directory: Path, base_graph, load_mode, plan_class=Plan,
                   config_class: type = Config) -> Plan:
    """The plan of ``data`` (read from ``directory``): ``base_graph(key)`` gives a region's captured graph when
    first asked for, ``load_mode(path)`` each mode's plan; policy configs are read among the techniques
    ``config_class`` registers."""
    io = _io_from_json(data["io"])
    blocks = [Block(**b) for b in data["blocks"]]
    regions = []
    for r in data["regions"]:
        region = Region(r["name"], r["kind"], [], outputs=[None] * r["outputs"],
                        block=blocks[r["block"]] if r["block"] is not None else None,
                        streams=[tuple(s) for s in r["streams"]], primary_stream=r["primary_stream"],
                        latent_stream=r["latent_stream"])
        key = VariantKey(r["signature"], (), io.rows)
        regions.append(RegionModule(region, r["signature"], lambda key=key: base_graph(key)))
    roles = InputRoles(io.input_names[io.position("latents")] if io.position("latents") is not None else None,
                       io.input_names[io.position("timestep")] if io.position("timestep") is not None else None,
                       [n for n, role in io.input_roles.items() if role in ("latents", "tokens")],
                       [n for n, role in io.input_roles.items() if role in ("condition", "labels", "timestep")],
                       [n for n, role in io.input_roles.items() if role == "weight"])
    structure = DiTStructure(None, roles, blocks, [rm.region for rm in regions], [], [])
    plan = plan_class(structure, io, regions, data["flops"], null_class=data["null_class"],
                      tokens=data.get("tokens", 0))
    for entry in data.get("modes", []):
        key = ModeKey(**entry) if isinstance(entry, dict) else _mode_of_format_1(entry)
        plan.modes[key] = load_mode(directory / "modes" / key.name)
        inputs = load_file(str(directory / "modes" / key.name / "inputs.safetensors"))
        plan.mode_inputs[key] = [inputs[str(i)] for i in range(len(inputs))]
    plan.transforms = {name: Transform(name, _not_buildable, t["after_rows"], t.get("compiled", t["after_rows"]))
                       for name, t in data["transforms"].items()}
    plan.offers = {name: set(offered) for name, offered in data["offers"].items()}
    classes = config_classes(config_class)
    plan.policies = [technique_from_json(c, directory, directory / "plan.json", classes) for c in data["policies"]]
    plan.unavailable = dict(data.get("unavailable", {}))
    return plan


def _mode_of_format_1(name: str) -> ModeKey:
    """A mode of a ``ditfx.plan/1`` file, which names it only: the token budget's, ``p<patch size>``."""
    return ModeKey("budget", int(name[1:]), name)


def _not_buildable(rm, gm):
    raise VariantUnavailable("a loaded plan runs the variants it was saved with and builds no others")


def _io_from_json(data: dict) -> IOSpec:
    data = dict(data)
    data["output_tree"] = _tree_from_json(data["output_tree"])
    data["output_meta"] = [None if m is None else (tuple(m["shape"]), getattr(torch, m["dtype"]), m["device"])
                           for m in data["output_meta"]]
    return IOSpec(**data)


def _tree_from_json(data):
    if isinstance(data, dict):
        ((kind, value),) = data.items()
        if kind == "dict":
            return {k: _tree_from_json(v) for k, v in value.items()}
        items = [_tree_from_json(v) for v in value]
        return tuple(items) if kind == "tuple" else items
    return data
