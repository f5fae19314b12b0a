"""Compile region graphs with the inner backend, once per structural signature and variant."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.fx as fx


def compile_region(gm: fx.GraphModule, args: list, backend: str) -> Callable:
    """Compile one region graph for these (real) example inputs."""
    if backend == "eager":
        return gm
    if backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, args)
    from torch._inductor.compile_fx import compile_fx

    # Inductor may mutate the graph it is given (pytorch#138980)
    return compile_fx(copy.deepcopy(gm), args)


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
