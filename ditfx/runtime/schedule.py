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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "ditfx.cache_schedule/1"


@dataclass
class CacheSchedule:
    blocks: list[str]  # block module paths: the model's fingerprint
    times: list[float]  # normalised time of each calibration step, decreasing
    change: list[list[float]]  # change[i][k], k >= 1; change[i][0] = 0
    mode: str = "residual"
    time_scale: float = 1000.0  # u = timestep / time_scale
    generations: int = 1
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.change) != len(self.blocks):
            raise ValueError(f"schedule has {len(self.change)} change curves for {len(self.blocks)} blocks")
        if any(len(c) != len(self.times) for c in self.change):
            raise ValueError("every change curve needs one value per calibration step")
        if len(self.times) < 2:
            raise ValueError("a schedule needs at least two calibration steps")

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

    def check_model(self, blocks: list[str]) -> None:
        """Raise if this schedule was calibrated on a model with other blocks."""
        if list(blocks) != list(self.blocks):
            raise ValueError(
                f"this cache schedule was calibrated for a model with {len(self.blocks)} blocks "
                f"({_head(self.blocks)}), but the model has {len(blocks)} ({_head(blocks)}): "
                "run 'ditfx calibrate' on this model"
            )

    # ----------------------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CacheSchedule:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cache schedule at {path}: write one with 'ditfx calibrate'")
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a ditfx cache schedule ({FORMAT})")
        return cls(**data)

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
