"""Turn analysed regions into standalone GraphModules, and give each a structural signature.

Two regions with the same signature compute the same function of their inputs (weights are inputs), so they
share one compiled artifact: a 28-block DiT compiles one block, not 28.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.structure import Region


class RegionModule:
    """A region as a GraphModule taking ``region.inputs`` positionally and returning ``region.outputs``.

    The GraphModule is built on first use: regions that share a signature share one compiled artifact, so on a
    deep model only the first block of each structure usually needs its own graph.
    """

    def __init__(self, region: Region, signature: str, build: Callable[[], fx.GraphModule]):
        self.region = region
        self.signature = signature
        self._build: Callable[[], fx.GraphModule] | None = build
        self._gm: fx.GraphModule | None = None

    @classmethod
    def of_graph(cls, region: Region, gm: fx.GraphModule) -> RegionModule:
        """A region whose graph already exists (a pass rewrote it)."""
        return cls(region, signature(gm), lambda: gm)

    @property
    def gm(self) -> fx.GraphModule:
        if self._gm is None:
            self._gm, self._build = self._build(), None
        return self._gm


def extract(root: fx.GraphModule, region: Region) -> RegionModule:
    """The region as a standalone graph (built when first used); values read from outside become placeholders."""
    body = [*_constants_and_nodes(region)]
    return RegionModule(region, _fingerprint(region.inputs, body, tuple(region.outputs)),
                        lambda: _build(root, region))


def _constants_and_nodes(region: Region):
    """The region's nodes in order, each preceded by the constants (``get_attr``) it is first to read."""
    seen = set(region.inputs)
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a not in seen and a.op == "get_attr":
                seen.add(a)
                yield a
        seen.add(n)
        yield n


def _build(root: fx.GraphModule, region: Region) -> fx.GraphModule:
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
    return fx.GraphModule(root, g, class_name=f"Region_{region.name.replace('.', '_')}")


def signature(gm: fx.GraphModule) -> str:
    """Hash of the graph's structure and its input types, independent of node names."""
    nodes = list(gm.graph.nodes)
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    return _fingerprint([n for n in nodes if n.op == "placeholder"], body, gm.graph.output_node().args[0])


def _fingerprint(inputs: list[fx.Node], body: list[fx.Node], outputs) -> str:
    """Hash of inputs' types, the body's ops and wiring, and which values are returned; node names play no
    part, so a region hashes alike before and after extraction, and blocks of one structure hash alike."""
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

    for n in inputs:
        index[n] = len(index)
        v = meta.tensor_value(n)
        desc = (tuple(v.shape), str(v.dtype), str(v.device)) if isinstance(v, torch.Tensor) else type(v)
        parts.append(f"in{desc}")
    for n in body:
        index[n] = len(index)
        if n.op == "get_attr":
            parts.append(f"attr:{n.target}")
        else:
            parts.append(f"{n.op}:{meta.target_name(n)}{fmt(n.args)}{fmt(n.kwargs)}")
    parts.append(f"output{fmt(tuple(outputs))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
