"""Capturing one call's graph: what Dynamo hands a backend (the FX graph and its example inputs), for the tools
that read a graph without running ditfx's compiler (inspection, token-budget training and calibration, history
distillation's heads, the tests)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx


def capture(fn: Callable, *args, fullgraph: bool = False, call: Callable[[Callable], object] | None = None,
            **kwargs) -> tuple[fx.GraphModule, list]:
    """Dynamo's first graph of one call ``fn(*args, **kwargs)`` (or ``call(compiled fn)``, for a caller that knows
    how to call it) and its example inputs, in the graph's order; no grad. Dynamo's caches are reset before and
    after: the capture is fresh and leaves nothing behind."""
    graphs: list[tuple[fx.GraphModule, list]] = []

    def keep(gm: fx.GraphModule, example_inputs: list):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend=keep, fullgraph=fullgraph, dynamic=False)
        with torch.no_grad():
            call(compiled) if call is not None else compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise RuntimeError(f"Dynamo captured no graph of {getattr(fn, '__name__', type(fn).__name__)}")
    return graphs[0]
