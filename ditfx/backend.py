"""The torch.compile backend ``"ditfx"``: capture -> analyse -> passes -> Plan -> executor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="ditfx",
options={...})`` works once ditfx is installed. Graphs ditfx cannot run (no DiT structure, dynamic shapes, a
graph break that splits the model's blocks, an error in a pass) fall back to the inner backend with a warning
that says what was turned off; they are never run wrongly.
"""
from __future__ import annotations

import warnings
import weakref

import torch.fx as fx

from ditfx.config import Config
from ditfx.graph import meta
from ditfx.graph.structure import StructureError, find_blocks, input_roles
from ditfx.model_facts import ModelFacts
from ditfx.passes.manager import build_plan
from ditfx.runtime.compiler import RegionCompiler, compile_region, keep_dynamo_compiling
from ditfx.runtime.executor import Executor
from ditfx.runtime.state import ModelRuntime

# runtimes made by backend="ditfx" (no handle to return them through): found later by their weights
_BACKEND_RUNTIMES: list[weakref.ref] = []


class DitfxBackend:
    """A backend bound to one config and one model's runtime (what :func:`ditfx.optimize` installs)."""

    def __init__(self, config: Config, runtime: ModelRuntime | None = None, facts: ModelFacts | None = None):
        self.config = config
        self.runtime = runtime or ModelRuntime()
        self.runtime.config = config
        self.facts = facts or ModelFacts()
        self._warned: set[str] = set()
        if self.runtime.compiler is None:
            self.runtime.compiler = RegionCompiler(config.compiler)

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        self.runtime.add(graphs=1)
        keep_dynamo_compiling()
        if meta.has_symbolic_inputs(gm):
            return self._fallback(gm, example_inputs, "Dynamo captured this graph with symbolic shapes (torch.compile "
                                  "without dynamic=False recompiles a second batch size dynamically; data-dependent "
                                  "sizes do it too); pass dynamic=False to torch.compile, or use ditfx.optimize")
        try:
            plan = build_plan(gm, self.config, facts=self.facts, example_inputs=example_inputs)
            if plan.policies and len(plan.block_names) < len(self.facts.blocks):
                return self._fallback(gm, example_inputs, (
                    f"this graph holds {len(plan.block_names)} of the model's {len(self.facts.blocks)} blocks "
                    "(a graph break splits the model), and ditfx's techniques need every block in one graph"))
            executor = Executor(plan, self.runtime, example_inputs, self.config.compile_regions == "all")
        except StructureError as e:
            if self.facts.blocks and not _has_blocks(gm):  # a piece of the model cut off by a graph break
                return self._fallback(gm, example_inputs, "Dynamo split the model at a graph break and this piece "
                                      f"holds none of its blocks ({e})", once="fragment")
            return self._fallback(gm, example_inputs, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - any failure to plan means this graph runs without ditfx
            return self._fallback(gm, example_inputs, f"{type(e).__name__}: {e}")
        self.runtime.executors.append(executor)
        return executor

    def __deepcopy__(self, memo):
        """A copy of an optimized model gets its own runtime (its own state and stats), compiled anew."""
        copy = DitfxBackend(self.config, facts=self.facts)
        _BACKEND_RUNTIMES.append(weakref.ref(copy.runtime))
        return copy

    def _fallback(self, gm: fx.GraphModule, example_inputs: list, why: str, once: str | None = None):
        self.runtime.fallbacks.append(why)
        self.runtime.add(graphs_without_ditfx=1)
        if once is not None:
            if once in self._warned:
                return self._noting_timestep(gm, compile_region(gm, example_inputs, self.config.compiler))
            self._warned.add(once)
        techniques = [technique.name for technique, _ in self.config.techniques()]
        off = f": {' and '.join(techniques)} off" if techniques else ""
        warnings.warn(f"ditfx: {why}. This graph is compiled with {self.config.compiler!r} without ditfx "
                      f"passes{off}.", stacklevel=2)
        return self._noting_timestep(gm, compile_region(gm, example_inputs, self.config.compiler))

    def _noting_timestep(self, gm: fx.GraphModule, compiled):
        """A piece cut off by a graph break that takes the model's timestep (Lumina2's time embedding, before its
        blocks' graph) tells the lifecycle, so the blocks' graph, which only sees the embedding, knows its step."""
        try:
            timestep = input_roles(gm).timestep
        except Exception:  # noqa: BLE001 - a piece ditfx cannot read just runs
            return compiled
        if timestep is None:
            return compiled
        pos = [n.name for n in gm.graph.find_nodes(op="placeholder")].index(timestep)
        lifecycle = self.runtime.lifecycle
        if getattr(compiled, "_boxed_call", False):
            def noting_boxed(args):
                lifecycle.note_timestep(args[pos])
                return compiled(args)

            noting_boxed._boxed_call = True
            return noting_boxed

        def noting(*args):
            lifecycle.note_timestep(args[pos])
            return compiled(*args)

        return noting


def _has_blocks(gm: fx.GraphModule) -> bool:
    return bool(find_blocks(gm))


# one runtime per torch.compile(..., options=...) call: Dynamo hands every graph of it the same options dict
_BY_OPTIONS: dict[int, tuple[dict | None, DitfxBackend]] = {}


def ditfx_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """Entry point of ``backend="ditfx"``; ``options`` are :class:`ditfx.Config` fields or ``{"config": cfg}``.

    The graphs of one ``torch.compile`` call (recompiles for new shapes) share one runtime: one lifecycle, one
    state, one set of stats."""
    known = _BY_OPTIONS.get(id(options)) if options is not None else None
    if known is not None and known[0] is options and known[1].runtime is not None:
        backend = known[1]
    else:
        backend = DitfxBackend(Config.from_options(options))
        _BACKEND_RUNTIMES.append(weakref.ref(backend.runtime))
        if options is not None:
            _BY_OPTIONS[id(options)] = (options, backend)
    return backend(gm, example_inputs)


def backend_runtimes() -> list[ModelRuntime]:
    alive = [r for ref in _BACKEND_RUNTIMES if (r := ref()) is not None]
    _BACKEND_RUNTIMES[:] = [weakref.ref(r) for r in alive]
    return alive
