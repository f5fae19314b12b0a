"""DiT structure analysis: input roles, prologue, repeated blocks of the residual token stream, epilogue.

A block region is defined on data flow, not on module names alone. ``nn_module_stack`` says which module a
node came from, but diffusers' DiT computes the timestep/label embedding inside every block's adaLN
(``transformer_blocks.N.norm1.emb``) from the model inputs; splitting by name would make those nodes part of
block N although nothing in them depends on the token stream, and partitions become cyclic. So:

- token inputs are the user inputs of rank >= 3 (latents, text tokens); conditioning inputs have rank <= 2
  (timestep, class labels, pooled text, position ids);
- a node is *stream-dependent* when it is reachable from a token input;
- block nodes that are not stream-dependent are hoisted to the prologue, unless only their own block reads
  them (a block's adaLN projection of the conditioning): those stay, so a skipped block skips them too;
- every other node goes to the earliest segment after all the blocks it depends on, so the graph becomes
  ``prologue, block 0, glue 1, block 1, ..., block N-1, epilogue`` (empty glues dropped).
"""
from __future__ import annotations

import operator
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.graph.inline import InlineReport, inline_subgraph_calls

RegionKind = Literal["prologue", "block", "glue", "epilogue"]

_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time")
_BLOCK_INDEX = re.compile(r"^(.*)\.(\d+)$")


class StructureError(ValueError):
    """The graph has no DiT structure that ditfx can split into blocks; the message says what is missing."""


@dataclass(frozen=True)
class Block:
    """One repeated block of the residual token stream."""

    index: int  # position along the stream, 0..N-1
    path: str  # module fqn, e.g. "transformer_blocks.3"
    group: str  # container fqn, e.g. "transformer_blocks"
    cls: str  # module class name


@dataclass
class InputRoles:
    """What each user input of the graph is for; weights are lifted parameters and buffers."""

    latents: str | None
    timestep: str | None
    tokens: list[str]
    conditions: list[str]
    weights: list[str]

    def role_of(self, name: str) -> str:
        if name == self.latents:
            return "latents"
        if name == self.timestep:
            return "timestep"
        if name in self.tokens:
            return "tokens"
        if name in self.conditions:
            return "condition"
        return "weight"


@dataclass
class Region:
    """A contiguous piece of the graph: its nodes, the values it reads, the values others read from it."""

    name: str
    kind: RegionKind
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    block: Block | None = None
    # (output position, input position) pairs of the residual stream: output = input + residual
    streams: list[tuple[int, int]] = field(default_factory=list)
    # index into ``streams`` of the stream whose change decides dynamic caching
    primary_stream: int | None = None
    latent_stream: bool = False  # the primary stream carries the latents (not text tokens only)


@dataclass
class DiTStructure:
    gm: fx.GraphModule
    roles: InputRoles
    blocks: list[Block]
    regions: list[Region]
    hoisted: list[str]  # names of block nodes moved to the prologue
    attention: list[tuple[str, str]]  # (node name, region name) of attention calls
    inlined: InlineReport = field(default_factory=InlineReport)  # nested compile regions flattened first

    @property
    def block_regions(self) -> list[Region]:
        return [r for r in self.regions if r.kind == "block"]

    @property
    def latent_blocks(self) -> list[int]:
        """Indices of the blocks whose residual stream carries the latents (text-only refiners excluded)."""
        return [r.block.index for r in self.block_regions if r.latent_stream]

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------- roles


def input_roles(gm: fx.GraphModule, weight_names: set[str] | None = None) -> InputRoles:
    """Classify placeholders. ``weight_names`` lists lifted weights for export graphs; Dynamo names them."""
    latents = timestep = None
    tokens, conditions, weights = [], [], []
    for n in gm.graph.find_nodes(op="placeholder"):
        if meta.is_dynamo_weight(n) or (weight_names is not None and n.name in weight_names):
            weights.append(n.name)
            continue
        v = meta.tensor_value(n)
        if v is None:
            conditions.append(n.name)
            continue
        if v.dim() >= 3:
            tokens.append(n.name)
            latents = latents or n.name
        else:
            conditions.append(n.name)
            if timestep is None and v.dim() <= 1 and meta.user_input_name(n).lower() in _TIMESTEP_NAMES:
                timestep = n.name
    if timestep is None:
        timestep = _sinusoidal_input(gm, conditions)
    return InputRoles(latents, timestep, tokens, conditions, weights)


_SINUSOIDS = {torch.sin, torch.cos, "sin", "cos", torch.ops.aten.sin.default, torch.ops.aten.cos.default}


def _sinusoidal_input(gm: fx.GraphModule, conditions: list[str]) -> str | None:
    """The timestep by data flow, whatever its name (``noise_level``): the one floating-point input of rank <= 1
    that feeds a sinusoidal embedding (sin/cos of the input times frequencies)."""
    found = []
    for n in gm.graph.find_nodes(op="placeholder"):
        v = meta.tensor_value(n)
        if n.name not in conditions or v is None or v.dim() > 1 or not v.is_floating_point():
            continue
        seen, queue = {n}, [n]
        while queue:
            node = queue.pop()
            if node.op in ("call_function", "call_method") and node.target in _SINUSOIDS:
                found.append(n.name)
                break
            for u in node.users:
                if u not in seen:
                    seen.add(u)
                    queue.append(u)
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------- blocks


def find_blocks(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Map each node to the repeated block it belongs to (by module fqn).

    A repeated block is a module at ``<container>.<i>`` with at least two siblings of the same class under
    the same container, in a container whose blocks attend (a transformer block, not a stack of MLPs); a
    node belongs to the outermost such module on its stack.
    """
    members: dict[tuple[str, str], set[int]] = defaultdict(set)
    for n in gm.graph.nodes:
        for path, cls in meta.module_stack(n):
            m = _BLOCK_INDEX.match(path)
            if m:
                members[(m.group(1), cls)].add(int(m.group(2)))
    repeated = {key for key, idx in members.items() if len(idx) >= 2}
    owner: dict[fx.Node, str] = {}
    attending: set[tuple[str, str]] = set()  # groups whose blocks attend: transformer blocks, not MLP stacks
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        for path, cls in meta.module_stack(n):
            m = _BLOCK_INDEX.match(path)
            if m and (m.group(1), cls) in repeated:
                owner[n] = path
                if meta.is_attention(n):
                    attending.add((m.group(1), cls))
                break
    groups = {n: _BLOCK_INDEX.match(p).group(1) for n, p in owner.items()}
    keep = {prefix for prefix, _ in attending}
    return {n: p for n, p in owner.items() if groups[n] in keep}


def _context_parallel_split(node: fx.Node) -> bool:
    """A node of diffusers' context-parallel split hook (``EquipartitionSharder.shard``: chunk, then this rank's
    piece), by the source line Dynamo recorded for it."""
    frames = [line for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File ")]
    return bool(frames) and "diffusers/hooks/context_parallel.py" in frames[-1]


def _is_stream_dependent(gm: fx.GraphModule, roles: InputRoles) -> set[fx.Node]:
    return meta.dependents(gm.graph, (n for n in gm.graph.find_nodes(op="placeholder") if n.name in roles.tokens))


# -------------------------------------------------------------------------------------------- analysis


def analyse(gm: fx.GraphModule, weight_names: set[str] | None = None, min_blocks: int = 2) -> DiTStructure:
    """Find the DiT structure of a captured graph, or raise :class:`StructureError` saying what is missing.

    Calls of nested compile regions in ``gm`` are inlined in place first (:mod:`ditfx.graph.inline`).
    """
    try:
        inlined = inline_subgraph_calls(gm)
    except ValueError as e:  # a nested region ditfx cannot flatten: fall back like any unsplittable graph
        raise StructureError(f"cannot inline a nested compile region: {e}") from e
    roles = input_roles(gm, weight_names)
    if not roles.tokens:
        raise StructureError(
            "no token input found: a DiT takes latents (or tokens) as a tensor of rank >= 3 "
            "(batch, channels, height, width) or (batch, tokens, width)"
        )
    owner = find_blocks(gm)
    paths_in_order = list(dict.fromkeys(owner[n] for n in gm.graph.nodes if n in owner))
    stream = _is_stream_dependent(gm, roles)
    # hoist conditioning work out of blocks: it does not depend on the token stream; and the sequence splits of
    # diffusers' context parallelism that a block's pre-forward hook makes (Wan, QwenImage split at block 0): the
    # block then takes and returns shards, like every other block
    hoisted = [n for n in gm.graph.nodes if n in owner and (n not in stream or _context_parallel_split(n))]
    for n in hoisted:
        del owner[n]
    paths_in_order = [p for p in paths_in_order if p in set(owner.values())]
    if len(paths_in_order) < min_blocks:
        raise StructureError(
            f"found {len(paths_in_order)} repeated block(s) on the token stream, need at least {min_blocks}: "
            "ditfx looks for modules at '<container>.<i>' (an nn.ModuleList of blocks) with the same class, "
            "whose nodes depend on the latents; keep the blocks in an nn.ModuleList and call them in order"
        )
    ordinal = {p: i for i, p in enumerate(paths_in_order)}
    blocks = []
    for p in paths_in_order:
        group = _BLOCK_INDEX.match(p).group(1)
        cls = next(c for path, c in meta.module_stack(next(n for n in owner if owner[n] == p)) if path == p)
        blocks.append(Block(ordinal[p], p, group, cls))

    # segment: block b -> ("block", b); glue after block d -> ("glue", d + 1); prologue is glue 0
    segment: dict[fx.Node, tuple[str, int]] = {}
    dep: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            dep[n] = -1
            continue
        d = max((dep[a] for a in n.all_input_nodes), default=-1)
        if n in owner:
            b = ordinal[owner[n]]
            if d > b:
                raise StructureError(
                    f"node {n.name!r} of block {paths_in_order[b]!r} reads a value computed after that block "
                    f"(by block {paths_in_order[d]!r}); blocks must run in order along the token stream"
                )
            for a in n.all_input_nodes:
                if a not in owner and a.op not in ("placeholder", "get_attr") and dep[a] == b:
                    raise StructureError(
                        f"block {paths_in_order[b]!r} reads {a.name!r}, which is computed outside the block from "
                        "the block's own output: the graph cannot be split into ordered regions"
                    )
            dep[n] = b
            segment[n] = ("block", b)
        else:
            dep[n] = d
            segment[n] = ("glue", d + 1)

    # per-block conditioning (a block's own adaLN projection) goes back into the one block that reads it,
    # so a skipped block skips it too; conditioning read elsewhere stays in the prologue
    for n in reversed(hoisted):
        readers = {segment.get(u) for u in n.users}
        if (len(readers) == 1 and (only := next(iter(readers))) is not None and only[0] == "block"
                and not _context_parallel_split(n)):
            segment[n] = only
    hoisted = [n for n in hoisted if segment[n][0] != "block"]

    n_blocks = len(blocks)
    regions: list[Region] = []
    by_segment: dict[tuple[str, int], list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n in segment:
            by_segment[segment[n]].append(n)
    for i in range(n_blocks + 1):
        glue = by_segment.get(("glue", i), [])
        if glue or i in (0, n_blocks):
            kind: RegionKind = "prologue" if i == 0 else "epilogue" if i == n_blocks else "glue"
            name = kind if kind != "glue" else f"glue.{i}"
            regions.append(Region(name, kind, glue))
        if i < n_blocks:
            regions.append(Region(f"block.{i}", "block", by_segment[("block", i)], block=blocks[i]))
    _connect(gm, regions)
    _pair_streams(regions, roles, gm, stream)
    attention = [
        (n.name, r.name)
        for r in regions
        for n in r.nodes
        if meta.is_attention(n)
    ]
    return DiTStructure(gm, roles, blocks, regions, [n.name for n in hoisted], attention, inlined)


def _connect(gm: fx.GraphModule, regions: list[Region]) -> None:
    """Fill each region's inputs (values read from outside) and outputs (values read by others)."""
    read_outside: set[fx.Node] = set()
    for r in regions:
        members = set(r.nodes)
        seen = []
        for n in r.nodes:
            for a in n.all_input_nodes:
                if a not in members and a.op != "get_attr" and a not in seen:
                    seen.append(a)
        r.inputs = seen
        read_outside.update(a for a in seen if a.op != "placeholder")
    out_node = gm.graph.find_nodes(op="output")[0]
    read_outside.update(out_node.all_input_nodes)
    for r in regions:
        r.outputs = [n for n in r.nodes if n in read_outside]


_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_",
                torch.ops.aten.add.Tensor}
_PASS_THROUGH = {"to", "contiguous", "clone", "float", "type_as", "clip", "clamp", torch.clip, torch.clamp,
                 torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.clamp.default}


def residual_source(out: fx.Node, inputs: list[fx.Node], members: set[fx.Node]) -> int | None:
    """Position in ``inputs`` of the stream input that ``out`` adds onto, following residual adds.

    Matches ``out = add(..add(x, f(x)).., g(..))`` (operands in either order, through dtype casts and clamps):
    the nearest region input of the same shape reached through add nodes, or of a shape that broadcasts to it (a
    text stream given once for a batch of images: Flux's ``num_images_per_prompt`` with ``prompt_embeds``).
    """
    shape = getattr(meta.tensor_value(out), "shape", None)
    queue, seen = deque([out]), {out}
    while queue:
        n = queue.popleft()
        if n.op not in ("call_function", "call_method"):
            continue
        if n.target in _ADD_TARGETS:
            operands = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        elif n.target in _PASS_THROUGH:
            operands = [n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else []
        else:
            continue
        for a in operands:
            if a in inputs and _broadcasts_to(getattr(meta.tensor_value(a), "shape", None), shape):
                return inputs.index(a)
        for a in operands:
            if a in members and a not in seen:
                seen.add(a)
                queue.append(a)
    return None


def _broadcasts_to(shape, target) -> bool:
    """``shape`` equals ``target``, or expands to it along size-1 dimensions of the same rank."""
    if shape is None or target is None or len(shape) != len(target):
        return False
    return all(a == b or a == 1 for a, b in zip(shape, target))


def _pair_streams(regions: list[Region], roles: InputRoles, gm: fx.GraphModule,
                  stream: set[fx.Node]) -> None:
    """Pair each block output with the stream input it is a residual update of; pick the primary stream.

    The primary stream is the one that carries the latents (followed through the chain of blocks); its change
    between steps drives dynamic caching.
    """
    latent_only, from_latents = _latent_only(gm, roles)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    label: dict[fx.Node, bool] = {}
    for r in regions:
        if r.kind != "block":
            continue
        members = set(r.nodes)
        r.streams = []
        candidates = [a for a in r.inputs if a in stream]
        for o_pos, o in enumerate(r.outputs):
            i_pos = residual_source(o, r.inputs, members)
            if i_pos is None:
                # no residual add leads back to an input: Flux single-stream blocks concatenate text and image
                # tokens and slice them apart again, HunyuanDiT's skip blocks re-project cat(skip, x) before
                # their residual adds. The output continues the stream input of its type; of several, the
                # newest is the stream (an older one arrives through a long skip connection).
                same = [a for a in candidates if _same_tensor_type(a, o)]
                i_pos = r.inputs.index(max(same, key=order.__getitem__)) if same else None
            if i_pos is not None:
                r.streams.append((o_pos, i_pos))
        best, best_key = None, None
        for s, (o_pos, i_pos) in enumerate(r.streams):
            inp = r.inputs[i_pos]
            is_latent = label.get(inp, inp in latent_only)
            label[r.outputs[o_pos]] = is_latent
            numel = getattr(meta.tensor_value(inp), "numel", lambda: 0)()
            key = (is_latent, numel)
            if best_key is None or key > best_key:
                best, best_key = s, key
        r.primary_stream = best
        r.latent_stream = best is not None and r.inputs[r.streams[best][1]] in from_latents


def _same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = meta.tensor_value(a), meta.tensor_value(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _latent_only(gm: fx.GraphModule, roles: InputRoles) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes that depend on the latents and on no other token input, and all nodes that depend on the latents."""
    from_latents, from_others = set(), set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.name == roles.latents:
                from_latents.add(n)
            elif n.name in roles.tokens:
                from_others.add(n)
            continue
        ins = n.all_input_nodes
        if any(a in from_latents for a in ins):
            from_latents.add(n)
        if any(a in from_others for a in ins):
            from_others.add(n)
    return from_latents - from_others, from_latents
