"""Turn analysed regions into standalone GraphModules, and give each a structural signature.

Two regions with the same signature compute the same function of their inputs (weights are inputs), so they
share one compiled artifact: a 28-block DiT compiles one block, not 28.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.structure import Region


@dataclass
class RegionModule:
    """A region as a GraphModule taking ``region.inputs`` positionally and returning ``region.outputs``."""

    region: Region
    gm: fx.GraphModule
    signature: str


def extract(root: fx.GraphModule, region: Region) -> RegionModule:
    """Copy the region's nodes into a new graph; values read from outside become placeholders."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, inp in enumerate(region.inputs):
        p = g.placeholder(f"in{i}")
        p.meta = {k: v for k, v in inp.meta.items() if k in ("val", "example_value", "tensor_meta")}
        env[inp] = p

    def arg(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":  # constants travel with the region
            env[a] = g.node_copy(a)
        return env[a]

    for n in region.nodes:
        env[n] = g.node_copy(n, arg)
    g.output(tuple(env[o] for o in region.outputs))
    gm = fx.GraphModule(root, g, class_name=f"Region_{region.name.replace('.', '_')}")
    return RegionModule(region, gm, signature(gm))


def signature(gm: fx.GraphModule) -> str:
    """Hash of the graph's structure and its input types, independent of node names."""
    index: dict[fx.Node, int] = {}
    parts: list[str] = []

    def fmt(a):
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            inner = ",".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in a.items()) + "}"
        return repr(a)

    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        if n.op == "placeholder":
            v = meta.tensor_value(n)
            desc = (tuple(v.shape), str(v.dtype), str(v.device)) if isinstance(v, torch.Tensor) else type(v)
            parts.append(f"in{desc}")
        elif n.op == "get_attr":
            parts.append(f"attr:{n.target}")
        else:
            parts.append(f"{n.op}:{meta.target_name(n)}{fmt(n.args)}{fmt(n.kwargs)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
