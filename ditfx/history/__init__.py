"""History attention (ARD, issue 17, in progress: docs/history.md): a few-step student whose lower blocks attend
to the keys and values of its own earlier steps.

* :mod:`ditfx.history.masks`: the training forward's block-causal and block-diagonal masks (flex_attention and SDPA);
* :mod:`ditfx.history.cost`: the history's FLOPs in closed form;
* :mod:`ditfx.history.oneshot`: the one-shot training forward (steps stacked along the batch).

The inference pass is :mod:`ditfx.passes.history`, its policy :mod:`ditfx.runtime.history`
(``ditfx.Config(history=ditfx.HistoryAttention(layers=N))``). Not yet: the distillation, the students.
"""
from ditfx.history.cost import HistoryCost, history_flops
from ditfx.history.masks import block_causal, block_diagonal, block_mask, dense
from ditfx.history.oneshot import one_shot

__all__ = ["HistoryCost", "block_causal", "block_diagonal", "block_mask", "dense", "history_flops", "one_shot"]
