"""A calibrated token-budget schedule: which steps run weak, chosen where the measured weak/native gap is smallest.

Written by :func:`ditfx.budget.calibrate`: for every step of a calibration generation it records the normalised
time, the relative gap between the weak and the native prediction on the same input, and the FLOPs each mode
costs; :meth:`BudgetSchedule.choose` then marks the steps with the smallest gaps weak, as few as bring the FLOPs
within a budget. At run time a call's step is the calibrated step nearest in normalised time, so one calibration serves
other step counts.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ditfx.validation import write_json_file

FORMAT = "ditfx.budget-schedule/1"


@dataclass
class BudgetSchedule:
    times: list[float]  # normalised time of each calibrated step, decreasing
    gaps: list[float]  # relative L2 gap |weak - native| / |native| of the prediction at each step
    flops_ratio: float  # FLOPs of a weak call over a native one (cost model)
    weak: list[bool] = field(default_factory=list)  # the chosen weak steps
    budget: float | None = None  # the FLOPs fraction the choice was made for
    patch: int = 0

    def __post_init__(self):
        if len(self.times) != len(self.gaps) or not self.times:
            raise ValueError(f"BudgetSchedule needs one gap per calibrated time, got {len(self.times)} times and "
                             f"{len(self.gaps)} gaps")
        if self.weak and len(self.weak) != len(self.times):
            raise ValueError(f"BudgetSchedule.weak has {len(self.weak)} entries for {len(self.times)} steps")

    def choose(self, flops: float) -> BudgetSchedule:
        """The steps with the smallest gaps weak, as few as bring the FLOPs within ``flops`` of native."""
        if not 0 < flops <= 1:
            raise ValueError(f"flops is a fraction of the native FLOPs in (0, 1], got {flops}")
        n = len(self.times)
        needed = weak_steps_for(n, self.flops_ratio, flops)
        order = sorted(range(n), key=lambda i: self.gaps[i])[:needed]
        weak = [i in set(order) for i in range(n)]
        return BudgetSchedule(self.times, self.gaps, self.flops_ratio, weak, flops, self.patch)

    def is_weak(self, u: float) -> bool:
        """Whether the calibrated step nearest to normalised time ``u`` runs weak."""
        if not self.weak:
            raise ValueError("this BudgetSchedule has no chosen weak steps: call choose(flops) first")
        i = min(range(len(self.times)), key=lambda k: abs(self.times[k] - u))
        return self.weak[i]

    def plot(self, path) -> Path:
        """The gap per step (PNG), the chosen weak steps marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot(self.times, self.gaps, "-o", ms=3, color="C0", label="weak/native gap")
        if self.weak:
            ax.scatter([t for t, w in zip(self.times, self.weak) if w], [g for g, w in zip(self.gaps, self.weak) if w],
                       color="C3", zorder=3, label=f"weak at flops {self.budget}")
        ax.invert_xaxis()
        ax.set_xlabel("normalised time t / T (generation runs right)")
        ax.set_ylabel("|weak - native| / |native|")
        ax.set_title(f"patch {self.patch}: {self.flops_ratio:.3f} of the native FLOPs per call")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, path) -> Path:
        return write_json_file(path, FORMAT, asdict(self))

    @classmethod
    def load(cls, path) -> BudgetSchedule:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the budget schedule {path}: {e}") from e
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a ditfx budget schedule (expected format {FORMAT!r})")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from e


def weak_steps_for(steps: int, ratio: float, flops: float) -> int:
    """The fewest of ``steps`` steps that must run weak (each costing ``ratio`` of a native step) for the
    generation to cost at most ``flops`` of the native FLOPs (all of them when even that is not enough)."""
    if ratio >= 1:
        return steps
    k = math.ceil((1 - flops) * steps / (1 - ratio) - 1e-9)
    return max(0, min(steps, k))
