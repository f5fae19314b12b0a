"""Compile region graphs with the inner backend, once per structural signature and variant."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx

_PROBE_STARTED = False
_GRAPHS = 0  # graphs ditfx has compiled in this process
_GRAPHS_LOCK = threading.Lock()
HEADROOM = 8  # Dynamo's default recompile_limit: new graphs ditfx leaves room for


def keep_dynamo_compiling() -> None:
    """Leave Dynamo room for more graphs of ditfx's models: every optimized model (and batch size) is a cache
    entry of the same code object, and past ``recompile_limit`` Dynamo runs the model uncompiled. Called by every
    backend ditfx hands Dynamo (the compiler's, and the training forwards')."""
    global _GRAPHS
    with _GRAPHS_LOCK:
        _GRAPHS += 1
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, _GRAPHS + HEADROOM)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 32 * (_GRAPHS + HEADROOM))


def probe_cpu_in_background() -> None:
    """Start Inductor's once-per-process CPU probe now, in a thread: it builds test programs with the C++ compiler
    (about 2 s on this project's CPU) before the first CPU kernel can load, and started at ``ditfx.optimize`` it
    overlaps Dynamo's tracing of the first call instead of following it. The probe's result is cached by Inductor;
    should it fail here, the compile that needs it runs it again and reports the error."""
    global _PROBE_STARTED
    if _PROBE_STARTED:
        return
    _PROBE_STARTED = True

    def probe():
        try:
            from torch._inductor import cpu_vec_isa

            cpu_vec_isa.pick_vec_isa()
        except Exception:  # noqa: BLE001 - see the docstring: the compile reports it
            pass

    threading.Thread(target=probe, name="ditfx-inductor-cpu-probe", daemon=True).start()


def compile_region(gm: fx.GraphModule, args: list, backend: str) -> Callable:
    """Compile one region graph for these (real) example inputs."""
    if backend == "eager":
        return gm
    if backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, args)
    from torch._inductor.compile_fx import compile_fx

    # Inductor may mutate the graph it is given (pytorch#138980)
    gm = copy.deepcopy(gm)
    with _shape_env_context() as own:
        if own:  # static shapes: the example inputs' sizes, as before (the ShapeEnv is there for the caches)
            return compile_fx(gm, args, ignore_shape_env=True)
        return compile_fx(gm, args)


@contextlib.contextmanager
def _shape_env_context() -> Iterator[bool]:
    """A tracing context whose fake mode has a ShapeEnv, as Dynamo installs around its backends, when there is
    none yet; yields whether it installed one.

    Regions are compiled when they first run, outside Dynamo. Without a ShapeEnv, Inductor's FX graph cache and
    AOTAutograd's cache skip every graph ("Bypassing FX Graph Cache because 'No shape env'"): nothing is
    written, a new process compiles everything again and ``torch.compiler.save_cache_artifacts()`` has nothing to
    save. With one (and ``ignore_shape_env``, so the inputs are fakified with static shapes, as
    ``torch._inductor.standalone_compile(dynamic_shapes="from_example_inputs")`` does), both caches are used.
    Inside a Dynamo backend (a fallback graph) Dynamo's own context is kept.
    """
    from torch._guards import TracingContext, tracing

    if TracingContext.try_get() is not None or not _compile_fx_ignores_shape_env():
        yield False
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # allow_non_fake_inputs: as the fake mode compile_fx makes for itself when no context is installed
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with tracing(TracingContext(fake_mode)):
        yield True


@functools.cache
def _compile_fx_ignores_shape_env() -> bool:
    """Whether this torch's ``compile_fx`` takes ``ignore_shape_env`` (it does since standalone_compile's
    ``dynamic_shapes``, torch 2.8); without it the regions compile as before, uncached."""
    from torch._inductor.compile_fx import compile_fx

    return "ignore_shape_env" in inspect.signature(compile_fx).parameters


class RegionCompiler:
    """Lazily compiles each (signature, variant) on its first call and reuses it for every region that shares
    the signature: blocks of the same structure take their weights as inputs, so one artifact serves all."""

    def __init__(self, backend: str):
        self.backend = backend
        self._compiled: dict[tuple, tuple[Callable, bool]] = {}  # key -> (callable, compiled by the backend)
        self.calls: dict[tuple[str, str], int] = {}  # invocations per (signature, variant)
        self.compiles = 0
        self.compile_seconds = 0.0

    def run(self, key: tuple, graph: Callable[[], fx.GraphModule], args: list, compile: bool = True):
        """Run the key's graph compiled (once per key), or as the captured FX graph when ``compile`` is False.
        ``graph()`` is called only for a key's first run: regions that share a key never build their own."""
        fn, compiled = self._compiled.get(key, (None, compile and self.backend != "eager"))
        if compiled:
            # One artifact serves every region with this signature, and Inductor specialises on input strides:
            # block 0 may receive a strided view from the uncompiled prologue, block 1 a contiguous tensor.
            args = [a.contiguous() if isinstance(a, torch.Tensor) and not a.is_contiguous() else a for a in args]
        if fn is None:
            if compiled:
                start = time.perf_counter()
                fn = compile_region(graph(), args, self.backend)
                self.compiles += 1
                self.compile_seconds += time.perf_counter() - start
            else:
                fn = graph()
            self._compiled[key] = (fn, compiled)
        self.calls[key] = self.calls.get(key, 0) + 1
        return fn(*args)
