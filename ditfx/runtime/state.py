"""What ditfx keeps for one optimized model: its lifecycle, each thread's policy state, stats and records.

Policy state lives in declared slots (:class:`~ditfx.runtime.policy.StateSlot`), in a store per thread: a new
generation (or its stated end) frees it all. Records (what the calibrations and traces read) outlive generations.
Nothing here holds the model's weights: a deleted model is freed.
"""
from __future__ import annotations

import threading

from ditfx.runtime.lifecycle import Lifecycle
from ditfx.runtime.parallel import context_parallel_group
from ditfx.runtime.rows import RowState
from ditfx.runtime.stats import Stats, dynamo_counts


class StateStore:
    """One thread's policy state for one optimized model."""

    def __init__(self):
        self.generation: int | None = None
        self._values: dict[tuple, object] = {}

    def start(self, generation: int) -> None:
        self._values.clear()
        self.generation = generation

    def clear(self) -> None:
        self._values.clear()
        self.generation = None

    def get(self, policy, name: str, ctx):
        slot = next((s for s in policy.slots if s.name == name), None)
        if slot is None:
            raise KeyError(f"{type(policy).__name__} declares no state slot {name!r}")
        key = (policy.name, name, ctx.full_rows, ctx.info.branch if slot.scope == "branch" else None,
               ctx.mode if slot.per_mode else None)
        value = self._values.get(key)
        if value is None:
            value = slot.init(ctx)
            if slot.per_row:
                value = RowState(value, ctx.full_rows)
            self._values[key] = value
        return value.view(ctx.rows) if slot.per_row else value


class ModelRuntime:
    """Shared by every graph Dynamo hands ditfx for one optimized model (recompiles make new graphs)."""

    def __init__(self):
        self.lifecycle = Lifecycle(on_end=lambda: self.store().clear())
        self.stats = Stats()
        self.records: dict[str, list] = {}
        self.executors: list = []
        self.config = None  # the ditfx.Config it runs (set by the backend)
        self.compiler = None  # the RegionCompiler every graph of the model shares (set by the backend)
        self.fallbacks: list[str] = []  # why graphs run without ditfx
        self.module = None  # () -> the optimized module (a weak reference), where ditfx.optimize knows it
        self._local = threading.local()
        self._lock = threading.Lock()
        self._dynamo_base = dynamo_counts()

    def parallel_group(self):
        """The module's context-parallel group (diffusers' ``enable_parallelism``), read at every call; None on
        one process."""
        module = self.module() if self.module is not None else None
        return context_parallel_group(module) if module is not None else None

    def store(self) -> StateStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = StateStore()
        return store

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def add_mode(self, mode: str | None, **counts) -> None:
        with self._lock:
            entry = self.stats.modes.setdefault(mode or "native", dict.fromkeys(counts, 0))
            for k, v in counts.items():
                entry[k] = entry.get(k, 0) + v

    def snapshot(self) -> Stats:
        breaks, recompiles = dynamo_counts()
        s = Stats(**self.stats.to_dict())
        s.graph_breaks = breaks - self._dynamo_base[0]
        s.recompiles = max(recompiles - self._dynamo_base[1], max(0, s.graphs - 1))
        if self.compiler is not None:
            s.region_compiles = self.compiler.compiles
            s.compile_seconds = self.compiler.compile_seconds
        return s

    def unavailable(self, technique: str) -> list[str]:
        """Why ``technique`` is off for the graphs of this model (empty where it runs on them)."""
        return [ex.plan.unavailable[technique] for ex in self.executors if technique in ex.plan.unavailable]

    def parameters(self) -> set[int]:
        """ids of the weights the model's graphs read (to find a model's runtime from the model)."""
        return {i for ex in self.executors for i in ex.weight_ids()}
