"""The torch.compile backend ``"ditfx"``: capture -> analyse -> passes -> Plan -> executor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="ditfx",
options={...})`` works once ditfx is installed. Graphs without a DiT structure fall back to the inner backend
with a warning; they are never run wrongly.
"""
from __future__ import annotations

import warnings
import weakref

import torch.fx as fx

from ditfx.config import Config
from ditfx.graph import meta
from ditfx.graph.structure import StructureError
from ditfx.passes.manager import build_plan
from ditfx.runtime.compiler import compile_region
from ditfx.runtime.executor import Executor
from ditfx.runtime.session import Session

# sessions made by backend="ditfx" (no handle to return them through): found later by their weights
_BACKEND_SESSIONS: list[weakref.ref] = []


class DitfxBackend:
    """A backend bound to one config and one session (what :func:`ditfx.optimize` installs)."""

    def __init__(self, config: Config, session: Session | None = None):
        self.config = config
        self.session = session or Session()

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        self.session.stats.graphs += 1
        if meta.has_symbolic_inputs(gm):
            return self._fallback(gm, example_inputs, "the graph has dynamic shapes; compile with dynamic=False")
        try:
            plan = build_plan(gm, self.config)
        except StructureError as e:
            return self._fallback(gm, example_inputs, str(e))
        executor = Executor(plan, self.config, self.session, example_inputs)
        self.session.executors.append(executor)
        return executor

    def _fallback(self, gm: fx.GraphModule, example_inputs: list, why: str):
        warnings.warn(f"ditfx: {why}. Compiling this graph with {self.config.compiler!r} without ditfx passes.",
                      stacklevel=2)
        return compile_region(gm, example_inputs, self.config.compiler)


def ditfx_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """Entry point of ``backend="ditfx"``; ``options`` are :class:`ditfx.Config` fields or ``{"config": cfg}``."""
    backend = DitfxBackend(Config.from_options(options))
    _BACKEND_SESSIONS.append(weakref.ref(backend.session))
    return backend(gm, example_inputs)


def backend_sessions() -> list[Session]:
    alive = [s for ref in _BACKEND_SESSIONS if (s := ref()) is not None]
    _BACKEND_SESSIONS[:] = [weakref.ref(s) for s in alive]
    return alive
