"""Token-budget patching (FlexiDiT): early, high-noise denoising steps at a coarser patch size (docs/token_budget.md).

* :mod:`ditfx.budget.config`: the knobs, :class:`TokenBudget`, and its check against a model;
* :mod:`ditfx.budget.adapter`: :class:`BudgetAdapter`, the weak mode's fitted tensors in one safetensors file;
* :mod:`ditfx.budget.schedule`: :class:`BudgetSchedule`, calibrated weak steps;
* :mod:`ditfx.budget.resize`: the layer conversions (PI-resize, de-embedding resize, sin-cos tables at coarse
  centres);
* :mod:`ditfx.budget.weak`: the weak mode as a rewrite of the captured graph (patch embedding, positional table,
  de-embedding; LoRA on the blocks), and its zero-shot and merged tensors;
* :mod:`ditfx.budget.variants`: the pass: one mode of the plan per level;
* :mod:`ditfx.budget.policy`: the mode selector: which mode each call runs in;
* :mod:`ditfx.budget.training`: :func:`distill`, training the weak mode on the model's own predictions;
* :mod:`ditfx.budget.calibration`: :func:`calibrate`, the weak/native gap per step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import ditfx.budget.policy  # noqa: F401  (registers the policy of its config)
from ditfx.budget import config, variants
from ditfx.budget.adapter import AdapterError, BudgetAdapter
from ditfx.budget.config import TokenBudget
from ditfx.budget.schedule import BudgetSchedule
from ditfx.budget.weak import BudgetConversionError
from ditfx.lazy import lazy_names
from ditfx.technique import Technique

if TYPE_CHECKING:
    from ditfx.budget.calibration import calibrate
    from ditfx.budget.resize import coarse_sincos_pos_embed, coarse_table, pi_resize, resize_deembed, resize_matrix
    from ditfx.budget.training import distill, plot_loss, zero_shot

TECHNIQUE = Technique(
    name="budget", configs=(TokenBudget,), offer=variants.offer, order=0,
    example="ditfx.TokenBudget(adapter=..., flops=0.6)", check_model=config.check_model,
    options={"token": TokenBudget}, option_examples={"token": "{'adapter': 'adapter.safetensors', 'flops': 0.6}"},
)

# Imported on first access (PEP 562): training and calibration pull in sympy and drive torch.compile.
__getattr__, __dir__ = lazy_names(__name__, {
    **{name: ("ditfx.budget.resize", name) for name in ("coarse_sincos_pos_embed", "coarse_table", "pi_resize",
                                                          "resize_deembed", "resize_matrix")},
    **{name: ("ditfx.budget.training", name) for name in ("distill", "plot_loss", "zero_shot")},
    "calibrate": ("ditfx.budget.calibration", "calibrate"),
})


__all__ = ["TECHNIQUE", "AdapterError", "BudgetAdapter", "BudgetConversionError", "BudgetSchedule", "TokenBudget",
           "calibrate", "coarse_sincos_pos_embed", "coarse_table", "distill", "pi_resize", "plot_loss",
           "resize_deembed", "resize_matrix", "zero_shot"]
