"""A session: the step tracker, per-generation state and statistics of one optimized model."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields

import torch

from ditfx.runtime.steps import StepTracker


@dataclass
class Stats(Mapping):
    """What ran. Block evaluations count (call, block) pairs; FLOPs come from the regions' cost model.

    A dataclass (``stats.nfe``) and a read-only mapping of its field names to their values (``stats["nfe"]``,
    ``"nfe" in stats``, ``stats.get("nfe")``, ``dict(stats)``, ``stats.items()``), in field order.

    ``nfe`` counts network evaluations per sample: a call of 2B rows on B samples (batched guidance) counts 2,
    a call computing B + k of them 1 + k/B. Without a guidance config the layout is not analysed and each call
    counts 1.
    """

    generations: int = 0
    steps: int = 0
    calls: int = 0
    block_evals: int = 0
    block_evals_skipped: int = 0
    flops: int = 0
    flops_skipped: int = 0
    nfe: float = 0.0  # network evaluations: a batched CFG call counts 2 (rows / samples per branch)
    nfe_skipped: float = 0.0  # evaluations guidance skipping did not run
    graph_breaks: int = 0
    recompiles: int = 0
    graphs: int = 0  # graphs Dynamo handed to the backend
    region_compiles: int = 0
    compile_seconds: float = 0.0

    def __getitem__(self, key: str):
        if key not in _STATS_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_STATS_FIELDS)

    def __len__(self) -> int:
        return len(_STATS_FIELDS)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in _STATS_FIELDS

    def to_dict(self) -> dict:
        return asdict(self)


_STATS_FIELDS: dict[str, None] = dict.fromkeys(f.name for f in fields(Stats))  # ordered, hashed lookups


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    recompiles = sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0
    return breaks, recompiles


class Session:
    """Shared by every graph Dynamo hands to the backend for one model (recompiles make new graphs)."""

    def __init__(self):
        self.tracker = StepTracker()
        self.stats = Stats()
        self.executors: list = []
        self._dynamo_base = _dynamo_counts()
        self.state: dict = {}  # per-generation runtime state, dropped when a generation ends

    def end_generation(self) -> None:
        """Free per-generation state; the next call starts a new generation."""
        self.state.clear()
        self.tracker.start_generation()

    def snapshot(self) -> Stats:
        breaks, recompiles = _dynamo_counts()
        s = Stats(**self.stats.to_dict())
        s.graph_breaks = breaks - self._dynamo_base[0]
        s.recompiles = max(recompiles - self._dynamo_base[1], max(0, s.graphs - 1))
        for ex in self.executors:
            s.region_compiles += ex.compiler.compiles
            s.compile_seconds += ex.compiler.compile_seconds
        return s

    def parameters(self) -> set[int]:
        """ids of the weights the session's graphs read (to find a session from a model)."""
        return {id(t) for ex in self.executors for t in ex.weights if isinstance(t, torch.Tensor)}
