"""LinearAG: the unconditional prediction as a least-squares affine combination of past predictions.

For step k the estimate is ``u_k ~ b0 c_k + sum_{j=1..W} (b_j c_{k-j} + b'_j u_{k-j}) + b_1``: the current
conditional prediction (computed anyway), the predictions of the ``W`` previous steps, and an intercept.
Coefficients are scalars per step, fitted by ordinary least squares over every element of every sample of
recorded full-guidance trajectories (Castillo et al., section 2.5).

The step schedule: steps in the first half alternate exact guidance (even k) and estimated guidance (odd k),
the second half is conditional only. Coefficients are per step index of the calibrated step count, and the
runtime checks that a generation follows the calibrated grid of normalised times.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ditfx.validation import (
    WrongType,
    build_from_file,
    check_float,
    check_floats,
    check_int,
    check_list,
    check_strictly_decreasing,
    read_json_file,
    write_json_file,
)

FORMAT = "ditfx.linear_ag/1"
_REMEDY = "fit the coefficients again with 'ditfx calibrate-guidance' or ditfx.calibrate_guidance()"
WINDOW = 2  # past steps used by the estimate


def step_kind(step: int, steps: int) -> str:
    """``"exact"``, ``"estimate"`` or ``"cond"`` (conditional only) for step ``step`` of ``steps``."""
    if step >= steps // 2:
        return "cond"
    return "exact" if step % 2 == 0 else "estimate"


def features(cond: list[torch.Tensor], uncond: list[torch.Tensor], k: int, window: int = WINDOW) -> list[torch.Tensor]:
    """Regressors of step ``k`` from per-step predictions (lists indexed by step): c_k, then c_{k-j}, u_{k-j}."""
    cols = [cond[k]]
    for j in range(1, window + 1):
        if k - j >= 0:
            cols += [cond[k - j], uncond[k - j]]
    return cols


def feature_count(k: int, window: int = WINDOW) -> int:
    """Number of regressors of step ``k`` (:func:`features`): c_k, then c_{k-j} and u_{k-j} for each past step."""
    return 1 + 2 * min(window, k)


def combine(betas: list[float], cols: list[torch.Tensor]) -> torch.Tensor:
    """sum_i betas[i] * cols[i] + betas[-1] (the intercept)."""
    out = torch.full_like(cols[0], betas[-1])
    for b, c in zip(betas, cols):
        out = out + b * c
    return out


@dataclass
class LinearAGCoefficients:
    times: list[float]  # normalised time of each calibrated step
    betas: list[list[float] | None]  # per step: one coefficient per feature, then the intercept (None: exact)
    fit_error: list[float | None]  # relative L2 error of the fit per estimated step
    window: int = WINDOW
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        o = "LinearAGCoefficients"
        self.window = check_int(o, "window", self.window, 0, hint=" (past steps used by the estimate)")
        self.times = check_floats(o, "times", self.times)
        if not self.times:
            raise ValueError(f"{o}.times is empty: coefficients cover at least one step")
        check_strictly_decreasing(o, "times", self.times)
        steps = len(self.times)
        betas = check_list(o, "betas", self.betas, what="list with one entry per step (None or a list of numbers)")
        errors = check_list(o, "fit_error", self.fit_error,
                            what="list with one entry per step (None or a number)")
        for name, values in (("betas", betas), ("fit_error", errors)):
            if len(values) != steps:
                raise ValueError(f"{o}.{name} has {len(values)} entries for {steps} steps (times): one per step")
        self.betas = []
        for k, b in enumerate(betas):
            if b is None:
                self.betas.append(None)
                continue
            b = check_floats(o, f"betas[{k}]", b)
            want = feature_count(k, self.window) + 1
            if len(b) != want:
                raise ValueError(f"{o}.betas[{k}] has {len(b)} coefficients; step {k} with window {self.window} "
                                 f"needs {want} ({want - 1} features, then the intercept)")
            self.betas.append(b)
        for k in range(steps):
            if step_kind(k, steps) == "estimate" and self.betas[k] is None:
                raise ValueError(f"{o}.betas[{k}] is None, but step {k} of {steps} is an estimated step: it needs "
                                 f"{feature_count(k, self.window) + 1} coefficients")
        self.fit_error = [None if e is None else check_float(o, f"fit_error[{k}]", e, 0)
                          for k, e in enumerate(errors)]
        if not isinstance(self.meta, dict):
            raise WrongType(f"{o}.meta must be a dict, got {type(self.meta).__name__}")

    @property
    def steps(self) -> int:
        return len(self.times)

    def save(self, path: str | Path) -> Path:
        return write_json_file(path, FORMAT, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> LinearAGCoefficients:
        """Read coefficients written by :meth:`save`; every error names the file and the field."""
        data = read_json_file(path, "LinearAG coefficient file", FORMAT,
                              "write them with 'ditfx calibrate-guidance' or ditfx.calibrate_guidance()", _REMEDY)
        return build_from_file(path, "LinearAG coefficient file", cls, data, _REMEDY)


def fit(cond: list[list[torch.Tensor]], uncond: list[list[torch.Tensor]], times: list[float],
        window: int = WINDOW) -> LinearAGCoefficients:
    """Fit the coefficients of every estimated step from recorded trajectories.

    ``cond[g][k]`` / ``uncond[g][k]``: predictions of generation ``g`` at step ``k``, (samples, ...).
    """
    steps = len(times)
    if not cond or any(len(c) != steps or len(u) != steps for c, u in zip(cond, uncond)):
        raise ValueError(f"every recorded generation needs {steps} steps of conditional and unconditional predictions")
    betas: list[list[float] | None] = []
    errors: list[float | None] = []
    for k in range(steps):
        if step_kind(k, steps) != "estimate":
            betas.append(None)
            errors.append(None)
            continue
        rows = [torch.stack([c.double().reshape(-1) for c in features(cg, ug, k, window)], dim=1)
                for cg, ug in zip(cond, uncond)]
        x = torch.cat(rows)  # (elements, features)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        y = torch.cat([ug[k].double().reshape(-1) for ug in uncond])
        solution = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        residual = (x @ solution - y).norm() / y.norm().clamp_min(1e-30)
        betas.append(solution.tolist())
        errors.append(float(residual))
    return LinearAGCoefficients(times=list(times), betas=betas, fit_error=errors, window=window)
