"""Token budgets' knobs: the config dataclass, validated on construction, and its check against a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ditfx.budget.adapter import BudgetAdapter
from ditfx.budget.schedule import BudgetSchedule
from ditfx.model_facts import ModelFacts
from ditfx.validation import WrongType, check_bool, check_choice, check_float, check_int, require, set_field


@dataclass(frozen=True)
class TokenBudget:
    """Token-budget patching (FlexiDiT): the early, high-noise steps run at a coarser patch size.

    ``adapter``: the weak mode's tensors, a :class:`~ditfx.budget.BudgetAdapter` or the path of one written by
    :func:`ditfx.budget.distill` (``ditfx.models.digits.budget_adapter()`` for the digits model); ``None`` runs the
    zero-shot mode (PI-resize of the native layers, no training) at ``patch_size`` (default twice the native).
    Which steps run weak, one of:

    * ``weak_until``: a fraction of normalised time: calls with ``t / time_scale > 1 - weak_until`` run weak
      (0: none, the exact native model);
    * ``flops``: the fraction of the native FLOPs to spend at most: on the step count at hand (the pipeline's
      scheduler says it) the fewest leading steps that bring the cost model's FLOPs within it run weak; without a
      known step count, the same fraction of normalised time (warned);
    * ``calibrated``: a :class:`~ditfx.budget.BudgetSchedule` (or the path of one) written by
      :func:`ditfx.budget.calibrate`, the measured weak/native gap per step: with ``flops``, the steps with the
      smallest gaps that bring the FLOPs within it run weak; alone, the weak steps the schedule has chosen.
      A call runs as the calibrated step nearest in normalised time.

    ``time_scale``: the timestep at noise level 1 (None: the adapter's, else 1000). ``merge_lora``: fold the
    adapter's low-rank updates into weak-mode copies of the block weights (a weak call then costs what the base
    linears cost; one more copy of those weights in memory); False runs the low-rank path.

    More than two levels: ``adapter`` (or, zero-shot, ``patch_size``) a list of several patch sizes and
    ``weak_until`` a list of the same length, each level's fraction of normalised time; a call runs at the
    coarsest level whose fraction covers it (``adapter=[p8, p4], weak_until=[0.2, 0.5]``: patch 8 for
    ``u > 0.8``, patch 4 for ``0.5 < u <= 0.8``, native after).
    """

    adapter: BudgetAdapter | str | Path | tuple | list | None = field(default=None, repr=False)
    weak_until: float | tuple | list | None = None
    flops: float | None = None
    calibrated: BudgetSchedule | str | Path | None = field(default=None, repr=False)
    patch_size: int | tuple | list | None = None
    time_scale: float | None = None
    resize: str = "bilinear"
    merge_lora: bool = True

    def __post_init__(self):
        o = "TokenBudget"
        check_choice(o, "resize", self.resize, ("bilinear", "bicubic"),
                     f"TokenBudget.resize must be 'bilinear' or 'bicubic', got {self.resize!r}")
        check_bool(o, "merge_lora", self.merge_lora)
        several = [n for n in ("adapter", "patch_size", "weak_until") if isinstance(getattr(self, n), (list, tuple))]
        if several:
            return self._check_levels(several)
        if isinstance(self.adapter, (str, Path)):
            set_field(self, "adapter", BudgetAdapter.load(self.adapter))
        if self.adapter is not None and not isinstance(self.adapter, BudgetAdapter):
            raise WrongType("TokenBudget.adapter must be a ditfx.budget.BudgetAdapter, the path of one, a list of "
                            f"them (several levels), or None (zero-shot), got {type(self.adapter).__name__}")
        if isinstance(self.calibrated, (str, Path)):
            set_field(self, "calibrated", BudgetSchedule.load(self.calibrated))
        if self.calibrated is not None and not isinstance(self.calibrated, BudgetSchedule):
            raise WrongType("TokenBudget.calibrated must be a ditfx.budget.BudgetSchedule or the path of one written "
                            f"by ditfx.budget.calibrate, got {type(self.calibrated).__name__}")
        require(self.weak_until is None or (self.flops is None and self.calibrated is None),
               "TokenBudget.weak_until cannot be combined with flops or calibrated: choose one schedule")
        require(self.weak_until is not None or self.flops is not None or (
            self.calibrated is not None and bool(self.calibrated.weak)),
            "TokenBudget needs weak_until (normalised time), flops (a fraction of the native FLOPs, with or without "
            "a calibrated schedule) or a calibrated schedule whose weak steps are chosen")
        if self.weak_until is not None:
            set_field(self, "weak_until", check_float(o, "weak_until", self.weak_until, 0))
            require(self.weak_until <= 1, f"TokenBudget.weak_until is a fraction of normalised time in [0, 1], got "
                                         f"{self.weak_until}")
        if self.flops is not None:
            set_field(self, "flops", check_float(o, "flops", self.flops, 0))
            require(0 < self.flops <= 1, f"TokenBudget.flops is a fraction of the native FLOPs in (0, 1], got "
                                        f"{self.flops}")
            if self.calibrated is not None:
                set_field(self, "calibrated", self.calibrated.choose(self.flops))
        set_field(self, "patch_size", check_int(o, "patch_size", self.patch_size, 1, none_ok=True,
                                           hint=" (the weak patch size of the zero-shot mode)"))
        if self.adapter is not None and self.patch_size is not None and self.patch_size != self.adapter.patch:
            raise ValueError(f"TokenBudget.patch_size={self.patch_size} differs from the adapter's patch size "
                             f"{self.adapter.patch}: leave patch_size unset with an adapter")
        if self.time_scale is not None:
            set_field(self, "time_scale", check_float(o, "time_scale", self.time_scale))
            require(self.time_scale > 0, f"TokenBudget.time_scale must be > 0, got {self.time_scale}")

    def _check_levels(self, several: list[str]) -> None:
        o = "TokenBudget"
        require(self.flops is None and self.calibrated is None,
               "TokenBudget with several levels takes weak_until per level, not flops or calibrated")
        require(isinstance(self.weak_until, (list, tuple)),
               "TokenBudget with several adapters or patch sizes needs weak_until as a list, one fraction per level")
        n = len(self.weak_until)
        weak = tuple(check_float(o, "weak_until", w, 0) for w in self.weak_until)
        require(all(w <= 1 for w in weak), f"TokenBudget.weak_until values are fractions in [0, 1], got {weak}")
        if self.adapter is not None:
            adapters = self.adapter if isinstance(self.adapter, (list, tuple)) else [self.adapter]
            adapters = tuple(BudgetAdapter.load(a) if isinstance(a, (str, Path)) else a for a in adapters)
            if not all(isinstance(a, BudgetAdapter) for a in adapters):
                raise WrongType("TokenBudget.adapter entries must be ditfx.budget.BudgetAdapter or paths of them")
            require(self.patch_size is None, "leave TokenBudget.patch_size unset with adapters")
            patches = tuple(a.patch for a in adapters)
            set_field(self, "adapter", adapters)
        else:
            patches = self.patch_size if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,)
            patches = tuple(check_int(o, "patch_size", p, 1) for p in patches)
            set_field(self, "patch_size", patches)
        require(len(patches) == n and n >= 1, f"TokenBudget: {len(patches)} level(s) of patch sizes and {n} weak_until "
                                             "values: give one weak_until per level")
        require(len(set(patches)) == n, f"TokenBudget: each level needs its own patch size, got {patches}")
        set_field(self, "weak_until", weak)
        if self.time_scale is not None:
            set_field(self, "time_scale", check_float(o, "time_scale", self.time_scale))
            require(self.time_scale > 0, f"TokenBudget.time_scale must be > 0, got {self.time_scale}")

    def levels(self) -> list[tuple[int | None, BudgetAdapter | None, float | None]]:
        """(patch size or None for the zero-shot default, adapter or None, weak_until) per level."""
        if isinstance(self.weak_until, tuple):
            if self.adapter is not None:
                return [(a.patch, a, w) for a, w in zip(self.adapter, self.weak_until)]
            return [(p, None, w) for p, w in zip(self.patch_size, self.weak_until)]
        return [(self.adapter.patch if self.adapter is not None else self.patch_size, self.adapter, self.weak_until)]

    @property
    def effective_time_scale(self) -> float:
        if self.time_scale is not None:
            return self.time_scale
        adapter = self.adapter[0] if isinstance(self.adapter, tuple) else self.adapter
        return adapter.time_scale if adapter is not None else 1000.0


def check_model(budget: TokenBudget, module, facts: ModelFacts) -> None:
    """Each adapter was made for this model's class."""
    for _, adapter, _ in budget.levels():
        made_for = (adapter.model or {}).get("class") if adapter is not None else None
        if made_for and made_for != type(module).__name__:
            raise ValueError(f"TokenBudget: the adapter (patch {adapter.patch}) was made for a {made_for}, this "
                             f"model is a {type(module).__name__}: distil one for it with ditfx.budget.distill")
