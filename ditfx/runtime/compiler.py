"""Compile region graphs with the inner backend, once per structural signature and variant."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

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
        self._compiled: dict[tuple[str, str], Callable] = {}
        self.calls: dict[tuple[str, str], int] = {}  # invocations per (signature, variant)
        self.compiles = 0
        self.compile_seconds = 0.0

    def run(self, key: tuple[str, str], gm: fx.GraphModule, args: list, compile: bool = True):
        """Run ``gm`` compiled (once per key), or as the captured FX graph when ``compile`` is False."""
        fn = self._compiled.get(key)
        if fn is None:
            if compile and self.backend != "eager":
                start = time.perf_counter()
                fn = compile_region(gm, args, self.backend)
                self.compiles += 1
                self.compile_seconds += time.perf_counter() - start
            else:
                fn = gm
            self._compiled[key] = fn
        self.calls[key] = self.calls.get(key, 0) + 1
        return fn(*args)
