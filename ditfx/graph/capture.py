"""Capturing one call's graph: what Dynamo hands a backend (the FX graph and its example inputs), for the tools
that read a graph without running ditfx's compiler (inspection, token-budget training and calibration, history
distillation's heads, the tests)."""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.fx as fx


class CaptureError(ValueError):
    """A call Dynamo cannot capture as asked: where in the model's code, and why."""


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _user_code(e: Exception) -> str:
    """The model's own line that Dynamo stopped at (its message's "from user code:" part, innermost frame)."""
    text = str(e)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', text.split("from user code:")[-1])
    frames = [f for f in frames if "/torch/" not in f[0]] or frames  # the model's line, not torch's polyfill
    if not frames:
        return "a place Dynamo does not name"
    path, line, function, code = frames[-1]
    return f"{path}:{line} ({function}: {code.strip()})"


def _cause(e: Exception) -> str:
    """The error under Dynamo's wrapper: the first line that names what went wrong."""
    found = re.search(r"got (\w+)\('(.+?)'\)", str(e))
    return f"{found.group(1)}: {found.group(2)}" if found else str(e).splitlines()[0]


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
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
        raise CaptureError(f"Dynamo cannot capture {_name(fn)} as one graph: it breaks the graph (a graph break, or "
                           f"a value that depends on the data) at "
                           f"{_user_code(e)}. This tool reads one whole graph; ditfx.optimize still compiles such a "
                           "model piece by piece (techniques apply to the piece that holds every block)") from None
    except torch._dynamo.exc.TorchRuntimeError as e:
        raise CaptureError(f"{_name(fn)} fails on these inputs ({_cause(e)}) at {_user_code(e)}: check the "
                           "inputs' shapes against the model's configuration") from None
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise RuntimeError(f"Dynamo captured no graph of {getattr(fn, '__name__', type(fn).__name__)}")
    return graphs[0]
