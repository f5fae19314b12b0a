"""Statistics of one optimized model: what ran, what was skipped, what was compiled."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields


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
    graphs_without_ditfx: int = 0  # of those, compiled without ditfx's passes (each warned with its reason)
    region_compiles: int = 0
    compile_seconds: float = 0.0
    # per mode ("native", or another mode's name such as the token budget's "p4"): calls and FLOPs, and what the
    # mode's technique counts (a token budget: tokens run, rows x tokens per row)
    modes: dict[str, dict[str, int]] = field(default_factory=dict)

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


def dynamo_counts() -> tuple[int, int]:
    if "torch._dynamo" not in sys.modules:  # nothing compiled (a loaded package): no breaks, and no 1 s import
        return 0, 0
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    recompiles = sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0
    return breaks, recompiles
