"""History attention (ARD, issue 17): a few-step student whose lower blocks attend to its own trajectory.

Started: :mod:`ditfx.history.masks` (the training forward's block-causal and block-diagonal masks, for
flex_attention and SDPA) and :mod:`ditfx.history.cost` (the history's FLOPs in closed form). The pass, the policy
with its static key/value history, the training forward and the distillation are not written yet.
"""
from ditfx.history.cost import HistoryCost, history_flops
from ditfx.history.masks import block_causal, block_diagonal, block_mask, dense

__all__ = ["HistoryCost", "block_causal", "block_diagonal", "block_mask", "dense", "history_flops"]
