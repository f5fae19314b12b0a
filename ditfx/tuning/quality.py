"""QualityBudget: how far an accelerated configuration's outputs may move from the reference's, and the check."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ditfx.validation import WrongType, check_float, require, set_field


def _over(excess: float) -> float:
    """A bound's violation from its excess (0: inside). A NaN excess comes from a NaN measure, which no comparison
    can place inside: ``max(0, nan)`` is 0, so it is made infinite here."""
    return math.inf if math.isnan(excess) else max(0.0, excess)


def _check_limits(limits) -> None:
    """``{name: (low, high)}``: finite numbers or None (an open side), at least one side, low <= high."""
    if not isinstance(limits, dict):
        raise WrongType(f"QualityBudget.limits must be a dict {{measure name: (low, high)}}, got "
                        f"{type(limits).__name__}")
    for name, bounds in limits.items():
        if not isinstance(name, str):
            raise WrongType(f"QualityBudget.limits maps the names (str) of metric's measures to bounds, got key "
                            f"{name!r}")
        where = f"QualityBudget.limits[{name!r}]"
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"{where} must be (low, high), None for an open side, got {bounds!r}")
        low, high = (check_float("QualityBudget", f"limits[{name!r}][{i}]", v, none_ok=True)
                     for i, v in enumerate(bounds))
        require(low is not None or high is not None, f"{where} bounds neither side: give low or high, or drop it")
        require(low is None or high is None or low <= high, f"{where} has its low {low} above its high {high}")


@dataclass(frozen=True)
class QualityBudget:
    """The quality a tuned configuration must keep, measured against the unaccelerated reference on the same inputs.

    * ``psnr``: the lowest mean PSNR (dB, >= 0) of the outputs against the reference's (None: not checked);
    * ``ssim``: the lowest mean SSIM, in (0, 1] (None: not checked);
    * ``fd``: the largest relative change, either way, of the ``"fd"`` measure ``metric`` returns, a fraction in
      [0, 1] (0.10: within 10 % of the reference's); needs a ``metric``;
    * ``accuracy``: the largest drop of the ``"accuracy"`` measure ``metric`` returns, a fraction in [0, 1] (0.01:
      one point); needs a ``metric``;
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
        set_field(self, "psnr", check_float(o, "psnr", self.psnr, 0, none_ok=True, hint=" (dB)"))
        set_field(self, "ssim", check_float(o, "ssim", self.ssim, 0, 1, none_ok=True))
        require(self.ssim != 0, f"{o}.ssim must be in (0, 1]: 0 bounds nothing (leave it None), got {self.ssim}")
        set_field(self, "fd", check_float(o, "fd", self.fd, 0, 1, none_ok=True,
                                          hint=" (a fraction of the reference's FD: 0.10 = within 10 %)"))
        set_field(self, "accuracy", check_float(o, "accuracy", self.accuracy, 0, 1, none_ok=True,
                                                hint=" (a fraction: 0.01 = one point of accuracy)"))
        if self.metric is not None and not callable(self.metric):
            raise WrongType(f"QualityBudget.metric must be a callable (outputs, reference) -> dict, got "
                            f"{type(self.metric).__name__}")
        _check_limits(self.limits)
        needs = self.bounded()
        if needs and self.metric is None:
            raise ValueError(f"QualityBudget: {needs} are measured by a metric: pass metric= (e.g. "
                             "ditfx.models.digits.TuningRun(...).metric), or leave them None")
        if not (needs or self.psnr is not None or self.ssim is not None):
            raise ValueError("QualityBudget bounds nothing: set psnr, ssim, fd, accuracy or limits")

    def bounded(self) -> list[str]:
        """The measures of ``metric`` this budget bounds."""
        return [n for n in ("fd", "accuracy") if getattr(self, n) is not None] + sorted(self.limits)

    def describe(self) -> dict:
        """The bounds, as JSON."""
        return {"psnr": self.psnr, "ssim": self.ssim, "fd": self.fd, "accuracy": self.accuracy,
                "limits": {k: list(v) for k, v in self.limits.items()},
                "metric": getattr(self.metric, "__qualname__", repr(self.metric)) if self.metric else None}

    def misses(self, measures: dict, reference: dict) -> dict[str, float]:
        """Each bound's violation as a fraction of its allowance (0: inside); a measure it needs but lacks raises.
        Outputs with NaN or infinite values (``measures["non_finite"]``, see ``measure``) are outside any budget,
        and so is a NaN measure."""
        def need(name, where):
            if name not in where or where[name] is None:
                raise ValueError(f"QualityBudget bounds {name!r} but the metric returned {sorted(where)}: return "
                                 f"{name!r} from metric, or leave the bound None")
            return where[name]

        if measures.get("non_finite"):
            return {"non_finite": math.inf}  # whatever else was measured on them
        out = {}
        if self.psnr is not None:
            out["psnr"] = _over((self.psnr - need("psnr", measures)) / max(self.psnr, 1e-9))
        if self.ssim is not None:
            out["ssim"] = _over((self.ssim - need("ssim", measures)) / max(self.ssim, 1e-9))
        if self.fd is not None:
            ref = need("fd", reference)
            change = abs(need("fd", measures) - ref) / max(abs(ref), 1e-12)
            out["fd"] = _over((change - self.fd) / max(self.fd, 1e-9))
        if self.accuracy is not None:
            drop = need("accuracy", reference) - need("accuracy", measures)
            out["accuracy"] = _over((drop - self.accuracy) / max(self.accuracy, 1e-9))
        for name, (low, high) in self.limits.items():
            value = need(name, measures)
            scale = max(abs(low if low is not None else high), 1e-9)
            below = (low - value) / scale if low is not None else 0.0
            above = (value - high) / scale if high is not None else 0.0
            out[name] = max(_over(below), _over(above))
        return out

    def usage(self, measures: dict, reference: dict) -> float:
        """The largest fraction of any bound's allowance the measures use (0: the reference's quality, 1: at a
        bound). PSNR and SSIM use it as the distance to the bound's value over the distance from perfect. Outputs
        with NaN or infinite values, or a NaN measure it bounds, use it all (inf)."""
        bounded = [n for n in ("psnr", "ssim") if getattr(self, n) is not None] + self.bounded()
        if measures.get("non_finite") or any(math.isnan(measures.get(n, 0.0)) for n in bounded):
            return math.inf
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
