"""Token-budget patching (FlexiDiT): early, high-noise denoising steps at a coarser patch size.

* :mod:`ditfx.budget.weak`: the weak mode as a rewrite of the captured graph (patch embedding, positional table,
  de-embedding, size literals; LoRA on the blocks), and its zero-shot tensors;
* :mod:`ditfx.budget.resize`: the layer conversions (PI-resize, de-embedding resize, sin-cos tables at coarse
  centres);
* :mod:`ditfx.budget.adapter`: :class:`BudgetAdapter`, the weak mode's tensors in one safetensors file;
* :mod:`ditfx.budget.training`: :func:`distill`, training the weak mode on the model's own predictions;
* :mod:`ditfx.budget.gaps`: :func:`calibrate`, the weak/native gap per step;
* :mod:`ditfx.budget.schedule`: :class:`BudgetSchedule`, calibrated weak steps.

``ditfx.TokenBudget`` turns it on; docs/token_budget.md.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ditfx.budget.adapter import AdapterError, BudgetAdapter
    from ditfx.budget.gaps import calibrate
    from ditfx.budget.resize import (coarse_sincos_pos_embed, coarse_table, pi_resize, resize_deembed,
                                     resize_matrix)
    from ditfx.budget.schedule import BudgetSchedule
    from ditfx.budget.training import distill, plot_loss, zero_shot
    from ditfx.budget.weak import BudgetConversionError

# Imported on first access (PEP 562): the budget policy needs only ``schedule``, and training pulls in sympy.
_LAZY = {
    "AdapterError": "adapter", "BudgetAdapter": "adapter",
    "coarse_sincos_pos_embed": "resize", "coarse_table": "resize", "pi_resize": "resize",
    "resize_deembed": "resize", "resize_matrix": "resize",
    "BudgetSchedule": "schedule",
    "BudgetConversionError": "weak",
    "distill": "training", "plot_loss": "training", "zero_shot": "training",
    "calibrate": "gaps",
}


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ditfx.budget' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"ditfx.budget.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["AdapterError", "BudgetAdapter", "BudgetConversionError", "BudgetSchedule", "calibrate",
           "coarse_sincos_pos_embed", "coarse_table", "distill", "pi_resize", "plot_loss", "resize_deembed",
           "resize_matrix", "zero_shot"]
