"""LinearAG: the unconditional prediction as a least-squares affine combination of past predictions.

For step k the estimate is ``u_k ~ b0 c_k + sum_{j=1..W} (b_j c_{k-j} + b'_j u_{k-j}) + b_1``: the current
conditional prediction (computed anyway), the predictions of the ``W`` previous steps, and an intercept.
Coefficients are scalars per step, fitted by ordinary least squares over every element of every sample of
recorded full-guidance trajectories (Castillo et al., section 2.5 of shared/research/methods.md).

The step schedule: steps in the first half alternate exact guidance (even k) and estimated guidance (odd k),
the second half is conditional only. Coefficients are per step index of the calibrated step count, and the
runtime checks that a generation follows the calibrated grid of normalised times.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT = "ditfx.linear_ag/1"
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

    @property
    def steps(self) -> int:
        return len(self.times)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearAGCoefficients:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LinearAG coefficients {path} not found: write them with "
                                    "'ditfx calibrate-guidance' or ditfx.calibrate_guidance()")
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a LinearAG coefficient file ({FORMAT})")
        return cls(**data)


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
