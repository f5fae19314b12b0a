"""The Plan: everything the runtime needs to run one captured graph, as data built before the first call.

The pass manager (:mod:`ditfx.passes.manager`) builds it; the runtime (:mod:`ditfx.runtime`) reads it and
imports no pass. It names no technique. It holds:

* an :class:`IOSpec`: the call's inputs and their roles, which inputs and region inputs carry the batch rows,
  the output structure, and which values each region may release;
* the regions in order, with their FLOPs;
* a variant table: region graphs under a structured :class:`VariantKey` (which graph transforms, at how many
  rows). Transforms are registered by name when the plan is built (``cache.residual`` by the block-cache pass,
  ``guidance.cosine`` by the guidance pass, ...), and the graph of a key is built on its first use;
* which transforms each region offers (``offers``), the configs of the policies to run, and the pass reports;
* other modes of the same model (a plan each, under a :class:`ModeKey`) and the inputs each mode's graph takes
  beyond the call's (the token budget's coarse-patch mode and its adapter tensors).

``ditfx.plan_io`` writes a plan as files and reads it back.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ditfx.graph.regions import RegionModule
from ditfx.graph.structure import DiTStructure


class VariantUnavailable(ValueError):
    """A variant of a region cannot be built (for instance, the graph cannot run on fewer rows safely)."""


@dataclass(frozen=True)
class VariantKey:
    """Which graph of a region runs: the region's structural signature, the transforms applied to the captured
    graph (in order), and the number of batch rows it runs on."""

    signature: str
    transforms: tuple[str, ...] = ()
    rows: int = 0


@dataclass(frozen=True)
class Transform:
    """A named graph transform a pass registers in the plan: ``build(region module, graph) -> graph``.

    ``after_rows``: applied to the graph already specialised to the key's rows (its extra inputs are not batch
    rows); otherwise applied to the captured graph before re-batching, and its extra inputs carry rows.
    ``compiled``: a region running this transform is compiled even where the region itself runs as its captured
    graph (``Config(compile_regions="blocks")`` leaves the prologue and epilogue uncompiled): the work the transform
    adds is only worth it compiled.
    """

    name: str
    build: Callable[[RegionModule, fx.GraphModule], fx.GraphModule]
    after_rows: bool = False
    compiled: bool = False


@dataclass(frozen=True)
class ModeKey:
    """A mode of the model other than the captured one: the ``technique`` that built it (and whose policy selects
    it), its ``level`` in that technique's own measure (the token budget: the patch size), and the ``name`` that
    stats, files and messages call it by (``"p4"``)."""

    technique: str
    level: int
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass
class IOSpec:
    """The call's interface, derived once from the captured graph."""

    input_names: list[str]
    input_roles: dict[str, str]  # name -> latents | timestep | tokens | condition | weight
    rows: int | None  # batch rows of the captured call (None: no batch)
    input_batch: list[bool]  # which call inputs carry the rows
    region_inputs: list[list[str]]
    region_outputs: list[list[str]]
    region_batch: list[list[bool]]  # per region, which inputs carry the rows
    release: list[list[str]]  # per region, values no later region reads
    output_names: list[str]  # flat outputs in order
    output_tree: Any  # the output structure with output names at the leaves
    output_meta: list[tuple[tuple[int, ...], torch.dtype, str] | None]  # shape, dtype, device per flat output

    def position(self, role: str) -> int | None:
        return next((i for i, n in enumerate(self.input_names) if self.input_roles.get(n) == role), None)

    def outputs(self, flat: list):
        """The call's outputs in the captured structure from ``flat`` values."""
        values = dict(zip(self.output_names, flat))
        return _rebuild(self.output_tree, values)

    def empty_outputs(self, device=None) -> list:
        return [torch.empty(m[0], dtype=m[1], device=device or m[2]) if m is not None else None
                for m in self.output_meta]


def _rebuild(tree, values: dict):
    if isinstance(tree, str):
        return values[tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(t, values) for t in tree)
    if isinstance(tree, list):
        return [_rebuild(t, values) for t in tree]
    if isinstance(tree, dict):
        return {k: _rebuild(v, values) for k, v in tree.items()}
    return tree


@dataclass
class Plan:
    """One captured graph, ready to run: see the module docstring."""

    structure: DiTStructure
    io: IOSpec
    regions: list[RegionModule]
    flops: dict[str, int]
    transforms: dict[str, Transform] = field(default_factory=dict)
    offers: dict[str, set[str]] = field(default_factory=dict)  # region name -> transforms it offers
    policies: list[Any] = field(default_factory=list)  # technique configs, in the order their policies chain
    reports: list = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # techniques off for this graph -> why
    rebatch: Callable[[fx.GraphModule, int, int, list[bool]], fx.GraphModule] | None = None
    null_class: int | None = None  # the unconditional class label of a class-conditional model
    tokens: int = 0  # tokens of the latent stream per sample
    # other modes of the same model: key -> its plan, and the inputs its graphs take after the call's
    modes: dict[ModeKey, Plan] = field(default_factory=dict)
    mode_inputs: dict[ModeKey, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _graphs: dict[VariantKey, fx.GraphModule] = field(default_factory=dict, repr=False)
    _refused: dict[tuple, str] = field(default_factory=dict, repr=False)

    @property
    def block_names(self) -> list[str]:
        return [b.path for b in self.structure.blocks]

    def blocks_offering(self, transform: str) -> list[int]:
        """Indices of the blocks whose regions offer ``transform``."""
        return sorted(rm.region.block.index for rm in self.regions
                      if rm.region.kind == "block" and transform in self.offers.get(rm.region.name, ()))

    def built(self) -> dict[VariantKey, fx.GraphModule]:
        """The variant graphs built so far."""
        return dict(self._graphs)

    def key(self, rm: RegionModule, transforms: tuple[str, ...] = (), rows: int | None = None) -> VariantKey:
        return VariantKey(rm.signature, transforms, self.io.rows if rows is None else rows)

    def graph(self, rm: RegionModule, key: VariantKey) -> fx.GraphModule:
        """The graph of ``key`` for region ``rm`` (built on first use); raises :class:`VariantUnavailable`."""
        found = self._graphs.get(key)
        if found is not None:
            return found
        refused = self._refused.get(key)
        if refused is not None:
            raise VariantUnavailable(refused)
        try:
            gm = self._build(rm, key)
        except VariantUnavailable as e:
            self._refused[key] = str(e)
            raise
        self._graphs[key] = gm
        return gm

    def input_values(self, rm: RegionModule, key: VariantKey) -> list:
        """Example values of the inputs of ``key``'s graph (tensors at the captured shapes), for policies that size
        their state by a variant's inputs."""
        return [p.meta.get("example_value", p.meta.get("val")) for p in self.graph(rm, key).graph.find_nodes(
            op="placeholder")]

    def _build(self, rm: RegionModule, key: VariantKey) -> fx.GraphModule:
        missing = [t for t in key.transforms if t not in self.offers.get(rm.region.name, ())]
        if missing:
            raise VariantUnavailable(f"{rm.region.name} offers no {missing} transform")
        before = tuple(t for t in key.transforms if not self.transforms[t].after_rows)
        after = [t for t in key.transforms if self.transforms[t].after_rows]
        if after:  # the after-rows transforms apply to the graph at the key's rows
            gm = self.graph(rm, VariantKey(key.signature, before, key.rows))
            for name in after:
                gm = self.transforms[name].build(rm, gm)
            return gm
        if key.rows != self.io.rows:
            if self.rebatch is None:
                raise VariantUnavailable(f"this plan cannot run {rm.region.name} on {key.rows} rows (no re-batching)")
            gm = self.graph(rm, VariantKey(key.signature, before, self.io.rows))
            flags = self.io.region_batch[self.regions.index(rm)]
            extra = len(list(gm.graph.find_nodes(op="placeholder"))) - len(flags)
            try:
                return self.rebatch(gm, self.io.rows, key.rows, flags + [True] * extra)
            except ValueError as e:
                raise VariantUnavailable(str(e)) from e
        gm = rm.gm
        for name in before:
            gm = self.transforms[name].build(rm, gm)
        return gm
