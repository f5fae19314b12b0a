"""Static block-caching schedules ("Cache Me if You Can", accumulate-until-delta), keyed by normalised time.

A calibration records, for every block i and step k, the mean relative L1 change of the block's cached value
(its residual, or its output) against step k-1: ``c[i][k] = |v_k - v_{k-1}|_1 / |v_{k-1}|_1``. Dividing by
the step's length in normalised time ``u = t / time_scale`` gives a change *rate*; on another step grid the
change of a step is the integral of that rate over the step, so one calibration serves other step counts and
reproduces the calibration's own schedule exactly on its own grid.

The rule, per block: accumulate the change since the last recompute; recompute at the step where the sum
exceeds delta (the first step of a generation always computes; delta = 0 recomputes every step). Not per block,
the blocks share one sum, of their mean change, and recompute together: a step then either runs every block or
none, so reused values never meet fresh ones computed from them.

A schedule holds the paths of the blocks it was calibrated on and, optionally (``fingerprint``), a hash of each
block's parameter names and shapes (:func:`block_fingerprint`), so that a schedule is refused on a model with
the same block paths but other widths. Schedules without a fingerprint (older files) are checked by paths only.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ditfx.validation import (
    WrongType,
    build_from_file,
    check_choice,
    check_float,
    check_floats,
    check_int,
    check_list,
    check_strictly_decreasing,
    read_json_file,
    write_json_file,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT = "ditfx.cache_schedule/1"
MODES = ("residual", "output")
_REMEDY = "write the schedule again with 'ditfx calibrate'"


def block_fingerprint(module: torch.nn.Module, paths: list[str]) -> dict[str, str]:
    """Per block path, a short description of the block's weights: ``"<parameter count>:<hash>"``, the hash
    (sha256, 16 hex digits) of the sorted (name, shape) pairs of its parameters. Dtypes and devices are left
    out: a model cast to bfloat16 or moved to a GPU keeps its fingerprint, a wider or deeper one does not."""
    out = {}
    for path in paths:
        try:
            block = module.get_submodule(path)
        except AttributeError:
            raise ValueError(f"block_fingerprint: the model has no submodule {path!r}") from None
        shapes = sorted((name, tuple(int(d) for d in p.shape)) for name, p in block.named_parameters())
        digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
        count = 0
        for _, shape in shapes:
            n = 1
            for d in shape:
                n *= d
            count += n
        out[path] = f"{count}:{digest}"
    return out


@dataclass
class CacheSchedule:
    blocks: list[str]  # block module paths: the model's fingerprint
    times: list[float]  # normalised time of each calibration step, decreasing
    change: list[list[float]]  # change[i][k], k >= 1; change[i][0] = 0
    mode: str = "residual"
    time_scale: float = 1000.0  # u = timestep / time_scale
    generations: int = 1
    meta: dict = field(default_factory=dict)
    fingerprint: dict | None = None  # block path -> block_fingerprint(); None: check the paths only

    def __post_init__(self):
        o = "CacheSchedule"
        self.blocks = check_list(o, "blocks", self.blocks, what="list of block module paths")
        for i, b in enumerate(self.blocks):
            if not isinstance(b, str):
                raise WrongType(f"{o}.blocks[{i}] must be a block module path (str), got {b!r}")
        if not self.blocks:
            raise ValueError(f"{o}.blocks is empty: a schedule covers at least one block")
        if len(set(self.blocks)) != len(self.blocks):
            twice = sorted({b for b in self.blocks if self.blocks.count(b) > 1})
            raise ValueError(f"{o}.blocks names a block more than once: {twice}")
        self.times = check_floats(o, "times", self.times)
        if len(self.times) < 2:
            raise ValueError(f"{o}.times: a schedule needs at least two calibration steps, got {len(self.times)}")
        check_strictly_decreasing(o, "times", self.times)
        curves = check_list(o, "change", self.change, what="list of change curves (one list per block)")
        if len(curves) != len(self.blocks):
            raise ValueError(f"{o}.change has {len(curves)} change curves for {len(self.blocks)} blocks: "
                             "one per block")
        self.change = [check_floats(o, f"change[{i}]", c, minimum=0) for i, c in enumerate(curves)]
        for i, c in enumerate(self.change):
            if len(c) != len(self.times):
                raise ValueError(f"{o}.change[{i}] has {len(c)} values for {len(self.times)} calibration steps: "
                                 "every change curve needs one value per calibration step")
        check_choice(o, "mode", self.mode, MODES)
        self.time_scale = check_float(o, "time_scale", self.time_scale)
        if self.time_scale <= 0:
            raise ValueError(f"{o}.time_scale must be > 0 (u = timestep / time_scale), got {self.time_scale}")
        self.generations = check_int(o, "generations", self.generations, 1, hint=" (calibration generations)")
        if not isinstance(self.meta, dict):
            raise WrongType(f"{o}.meta must be a dict, got {type(self.meta).__name__}")
        if self.fingerprint is not None:
            if not isinstance(self.fingerprint, dict):
                raise WrongType(f"{o}.fingerprint must be None or a dict of block path -> block_fingerprint(), "
                                f"got {type(self.fingerprint).__name__}")
            bad = [k for k, v in self.fingerprint.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise WrongType(f"{o}.fingerprint maps block paths to strings, got {bad[0]!r}: "
                                f"{self.fingerprint[bad[0]]!r}")
            extra = sorted(set(self.fingerprint) - set(self.blocks))
            if extra:
                raise ValueError(f"{o}.fingerprint names blocks the schedule does not have: {extra[:3]}")

    @property
    def steps(self) -> int:
        return len(self.times)

    def increment(self, block: int, u_prev: float, u: float) -> float:
        """Change of ``block`` accumulated between normalised times ``u_prev`` and ``u``."""
        lo, hi = min(u, u_prev), max(u, u_prev)
        total = 0.0
        times, curve = self.times, self.change[block]
        for k in range(1, len(times)):
            a, b = sorted((times[k], times[k - 1]))
            length = b - a
            if length <= 0:
                continue
            # outside the calibrated range the nearest interval's rate applies
            if k == len(times) - 1:
                a = min(a, lo)
            if k == 1:
                b = max(b, hi)
            overlap = max(0.0, min(b, hi) - max(a, lo))
            total += curve[k] / length * overlap
        return total

    def advance(self, acc: list[float], u_prev: float | None, u: float, delta: float, per_block: bool = True,
                blocks: list[int] | None = None) -> list[bool]:
        """One step of the rule for ``blocks`` (default: all): add each block's change from ``u_prev`` to ``u``
        (None: the generation's first step) to its sum in ``acc``; returns which blocks recompute (their sums
        restart at 0). Not ``per_block``, every block adds the blocks' mean change."""
        blocks = range(len(self.blocks)) if blocks is None else blocks
        compute = [False] * len(self.blocks)
        if u_prev is not None:
            steps = [self.increment(i, u_prev, u) for i in blocks]
            mean = sum(steps) / max(len(steps), 1)
            for i, inc in zip(blocks, steps):
                acc[i] += inc if per_block else mean
        for i in blocks:
            compute[i] = u_prev is None or delta == 0 or acc[i] > delta
            if compute[i]:
                acc[i] = 0.0
        return compute

    def plan(self, delta: float, times: list[float] | None = None, per_block: bool = True,
             blocks: list[int] | None = None) -> list[list[bool]]:
        """compute[i][k]: whether block i of ``blocks`` (default: all) runs at step k of a generation over
        ``times`` (default: the calibration grid); blocks outside ``blocks`` are left False."""
        times = self.times if times is None else times
        acc = [0.0] * len(self.blocks)
        steps = [self.advance(acc, times[k - 1] if k else None, u, delta, per_block, blocks)
                 for k, u in enumerate(times)]
        return [list(row) for row in zip(*steps)]

    def check_model(self, blocks: list[str], module: torch.nn.Module | None = None, ordered: bool = True) -> None:
        """Raise ValueError if this schedule was calibrated on a model with other blocks: other block paths,
        or, given the model ``module`` and a schedule with a fingerprint, blocks whose weights have other
        shapes (another width, depth of a block, ...). ``ordered=False``: ``blocks`` are the model's in
        registration order, which need not be the order the forward runs them in (the schedule's)."""
        if (list(blocks) if ordered else sorted(blocks)) != (list(self.blocks) if ordered else sorted(self.blocks)):
            raise ValueError(
                f"this cache schedule was calibrated for a model with {len(self.blocks)} blocks "
                f"({_head(self.blocks)}), but the model has {len(blocks)} ({_head(blocks)}): "
                "run 'ditfx calibrate' on this model"
            )
        if module is None or not self.fingerprint:
            return
        paths = [b for b in self.blocks if b in self.fingerprint]
        here = block_fingerprint(module, paths)
        differ = [b for b in paths if here[b] != self.fingerprint[b]]
        if differ:
            first = differ[0]
            raise ValueError(
                f"this cache schedule was calibrated for a model whose blocks have other weights' shapes: "
                f"{len(differ)} of {len(paths)} blocks differ ({_head(differ)}; {first}: calibrated "
                f"{self.fingerprint[first]}, this model {here[first]}, as parameter count:shape hash): "
                "run 'ditfx calibrate' on this model"
            )

    # ----------------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        return write_json_file(path, FORMAT, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> CacheSchedule:
        """Read a schedule written by :meth:`save`; every error names the file and the field."""
        data = read_json_file(path, "cache schedule", FORMAT, "write one with 'ditfx calibrate'", _REMEDY)
        return build_from_file(path, "cache schedule", cls, data, _REMEDY)

    def heatmap(self, path: str | Path, delta: float, per_block: bool = True) -> Path:
        """PNG: block x step, coloured by change, with a dot where the block is recomputed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        change = np.array(self.change, dtype=float)
        plan = np.array(self.plan(delta, per_block=per_block), dtype=bool)
        fig, ax = plt.subplots(figsize=(max(6, self.steps * 0.18), max(3, len(self.blocks) * 0.3)))
        im = ax.imshow(change, aspect="auto", cmap="viridis", interpolation="nearest")
        ys, xs = np.nonzero(plan)
        ax.scatter(xs, ys, s=8, c="white", marker="o", label="recomputed")
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        ax.set_title(f"relative L1 change per step ({self.mode}); delta={delta}: "
                     f"{plan.sum()}/{plan.size} block evaluations")
        fig.colorbar(im, ax=ax, label="relative L1 change")
        ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _head(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
