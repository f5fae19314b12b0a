"""QualityBudget: how far an accelerated configuration's outputs may move from the reference's, and the check."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ditfx.validation import WrongType, check_float


@dataclass(frozen=True)
class QualityBudget:
    """The quality a tuned configuration must keep, measured against the unaccelerated reference on the same inputs.

    * ``psnr``: the lowest mean PSNR (dB) of the outputs against the reference's (None: not checked);
    * ``ssim``: the lowest mean SSIM (None: not checked);
    * ``fd``: the largest relative change, either way, of the ``"fd"`` measure ``metric`` returns (0.10: within
      10 % of the reference's); needs a ``metric``;
    * ``accuracy``: the largest drop of the ``"accuracy"`` measure ``metric`` returns (0.01: one point); needs a
      ``metric``;
    * ``metric``: ``metric(outputs, reference) -> {name: value}`` over the concatenated outputs of all inputs (e.g.
      ``ditfx.models.digits.TuningRun.metric``: digits-FD and class accuracy); what it returns is recorded, and the
      names in ``limits`` are checked;
    * ``limits``: ``{name: (low, high)}`` absolute bounds on further measures of ``metric`` (None: open side).
    """

    psnr: float | None = 30.0
    ssim: float | None = None
    fd: float | None = None
    accuracy: float | None = None
    metric: Callable | None = field(default=None, repr=False)
    limits: dict = field(default_factory=dict)

    def __post_init__(self):
        o = "QualityBudget"
        for name in ("psnr", "ssim", "fd", "accuracy"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_float(o, name, value, 0))
        if self.metric is not None and not callable(self.metric):
            raise WrongType(f"QualityBudget.metric must be a callable (outputs, reference) -> dict, got "
                            f"{type(self.metric).__name__}")
        needs = [n for n in ("fd", "accuracy") if getattr(self, n) is not None] + sorted(self.limits)
        if needs and self.metric is None:
            raise ValueError(f"QualityBudget: {needs} are measured by a metric: pass metric= (e.g. "
                             "ditfx.models.digits.TuningRun(...).metric), or leave them None")
        if not isinstance(self.limits, dict) or not all(
                isinstance(v, (tuple, list)) and len(v) == 2 for v in self.limits.values()):
            raise ValueError("QualityBudget.limits maps a measure name to (low, high), None for an open side")
        if not (needs or self.psnr is not None or self.ssim is not None):
            raise ValueError("QualityBudget bounds nothing: set psnr, ssim, fd, accuracy or limits")

    def describe(self) -> dict:
        """The bounds, as JSON."""
        return {"psnr": self.psnr, "ssim": self.ssim, "fd": self.fd, "accuracy": self.accuracy,
                "limits": {k: list(v) for k, v in self.limits.items()},
                "metric": getattr(self.metric, "__qualname__", repr(self.metric)) if self.metric else None}

    def misses(self, measures: dict, reference: dict) -> dict[str, float]:
        """Each bound's violation as a fraction of its allowance (0: inside); a measure it needs but lacks raises."""
        def need(name, where):
            if name not in where or where[name] is None:
                raise ValueError(f"QualityBudget bounds {name!r} but the metric returned {sorted(where)}: return "
                                 f"{name!r} from metric, or leave the bound None")
            return where[name]

        out = {}
        if self.psnr is not None:
            out["psnr"] = max(0.0, (self.psnr - need("psnr", measures)) / max(self.psnr, 1e-9))
        if self.ssim is not None:
            out["ssim"] = max(0.0, (self.ssim - need("ssim", measures)) / max(self.ssim, 1e-9))
        if self.fd is not None:
            ref = need("fd", reference)
            change = abs(need("fd", measures) - ref) / max(abs(ref), 1e-12)
            out["fd"] = max(0.0, (change - self.fd) / max(self.fd, 1e-9))
        if self.accuracy is not None:
            drop = need("accuracy", reference) - need("accuracy", measures)
            out["accuracy"] = max(0.0, (drop - self.accuracy) / max(self.accuracy, 1e-9))
        for name, (low, high) in self.limits.items():
            value = need(name, measures)
            scale = max(abs(low if low is not None else high), 1e-9)
            below = (low - value) / scale if low is not None else 0.0
            above = (value - high) / scale if high is not None else 0.0
            out[name] = max(0.0, below, above)
        return {k: (v if math.isfinite(v) else math.inf) for k, v in out.items()}

    def usage(self, measures: dict, reference: dict) -> float:
        """The largest fraction of any bound's allowance the measures use (0: the reference's quality, 1: at a
        bound). PSNR and SSIM use it as the distance to the bound's value over the distance from perfect."""
        used = [0.0]
        if self.psnr is not None:
            used.append(min(self.psnr / max(measures.get("psnr", 0.0), 1e-9), 10.0))
        if self.ssim is not None:
            used.append((1.0 - measures.get("ssim", 0.0)) / max(1.0 - self.ssim, 1e-9))
        if self.fd is not None and self.fd > 0:
            used.append(abs(measures["fd"] - reference["fd"]) / max(abs(reference["fd"]), 1e-12) / self.fd)
        if self.accuracy is not None and self.accuracy > 0:
            used.append(max(0.0, reference["accuracy"] - measures["accuracy"]) / self.accuracy)
        for name, (low, high) in self.limits.items():  # the way from the reference's value to the bound
            value, ref = measures[name], reference.get(name, measures[name])
            if low is not None and value < ref:
                used.append((ref - value) / max(ref - low, 1e-12))
            if high is not None and value > ref:
                used.append((value - ref) / max(high - ref, 1e-12))
        return max(used)

    def tightened(self, margin: float) -> QualityBudget:
        """This budget with ``margin`` of each allowance held back: PSNR ``margin * 10`` dB higher, SSIM ``margin``
        of the way to 1, FD and accuracy ``(1 - margin)`` of their allowance, limits ``margin`` of their span
        narrower towards the middle."""
        def narrow(low, high):
            if low is not None and high is not None:
                pad = margin * (high - low) / 2
                return low + pad, high - pad
            return low, high

        return dataclasses.replace(
            self, psnr=None if self.psnr is None else self.psnr + 10.0 * margin,
            ssim=None if self.ssim is None else self.ssim + margin * (1.0 - self.ssim),
            fd=None if self.fd is None else self.fd * (1.0 - margin),
            accuracy=None if self.accuracy is None else self.accuracy * (1.0 - margin),
            limits={k: narrow(*v) for k, v in self.limits.items()})

    def inside(self, measures: dict, reference: dict) -> bool:
        # a tiny tolerance: measures of equal outputs round differently through numpy
        return all(v <= 1e-9 for v in self.misses(measures, reference).values())
