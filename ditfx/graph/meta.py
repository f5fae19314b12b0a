"""Small predicates and readers over FX graphs and their node metadata, for Dynamo (Torch IR) and torch.export
(ATen) graphs."""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

# Dynamo spells module paths as source expressions: L['self'].__dict__['_modules']['blocks'].0.attn
_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
_DYNAMO_WEIGHT = re.compile(r"^l_[a-z0-9_]*?_(parameters|buffers)_")
# hooks (diffusers' registry) wrap forward in functools.partial objects that bind the module: forward.__self__.x,
# or, wrapped twice, forward.args.0.x
_BOUND_SELF = re.compile(r"^(?:(?:_orig_mod\.)?forward\.(?:__self__|args\.\d+|func\.__self__)\.)+")
_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")


def normalize_module_path(path: str) -> str:
    """Turn a Dynamo or export module path into a dotted fqn: ``transformer_blocks.0.norm1``."""
    path = _DICT_MODULES.sub(r".\1", path)
    path = _ROOT.sub("", path)
    path = _SUBSCRIPT.sub(r".\1", path)
    path = _BOUND_SELF.sub("", path.strip("."))
    return path.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """The node's module stack, outermost first, as (dotted path, class name) pairs."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((normalize_module_path(path), name.rsplit(".", 1)[-1]))
    return [(p, c) for p, c in out if p]


def value(node: fx.Node) -> Any:
    """The example value of a node: ``val`` on ATen graphs, ``example_value`` on Dynamo graphs."""
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def tensor_value(node: Any) -> torch.Tensor | None:
    v = value(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_dynamo_weight(node: fx.Node) -> bool:
    """Dynamo lifts parameters and buffers to placeholders named after their source."""
    return node.op == "placeholder" and bool(_DYNAMO_WEIGHT.match(node.name))


def user_input_name(node: fx.Node) -> str:
    """The user-facing argument name of a placeholder: ``L_timestep_`` -> ``timestep``."""
    name = str(node.target)
    m = re.match(r"^[Ll]_(.*)_$", name)
    name = m.group(1) if m else name
    m = re.match(r"^kwargs_(.*)$", name)  # Dynamo spells **kwargs entries as kwargs_<name>
    return m.group(1) if m else name


def target_name(node: fx.Node) -> str:
    """A stable, printable name for a node's target (used in structural signatures and reports)."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{mod}.{name}" if mod else name


def is_attention(node: fx.Node) -> bool:
    """Attention calls: SDPA (Torch IR or any ATen variant), flex attention, or an explicit softmax."""
    name = target_name(node).lower()
    return "backward" not in name and any(k in name for k in ("scaled_dot_product", "flex_attention", "softmax"))


def has_symbolic_inputs(gm: fx.GraphModule) -> bool:
    """True when Dynamo passed symbolic sizes (dynamic shapes) as graph inputs."""
    for n in gm.graph.find_nodes(op="placeholder"):
        v = value(n)
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
            return True
    return False


def is_per_row(obj: Any, rows: int | None) -> bool:
    """Whether ``obj`` is a tensor with one entry per batch row (leading dimension ``rows``)."""
    return isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == rows


def dependents(graph: fx.Graph, sources: Iterable[fx.Node]) -> set[fx.Node]:
    """``sources`` and every node computed from them (graph order is topological: one pass)."""
    reached = set(sources)
    for n in graph.nodes:
        if n not in reached and any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def evaluate(gm: fx.GraphModule, name: str, example_inputs: list) -> Any:
    """The value of node ``name`` of ``gm`` on ``example_inputs``, computing only what it needs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    needed, todo = set(), [nodes[name]]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    interp = fx.Interpreter(gm)
    env = interp.env
    for ph, v in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        env[ph] = v
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in needed and n.op != "placeholder":
                env[n] = interp.run_node(n)
    return env[nodes[name]]
