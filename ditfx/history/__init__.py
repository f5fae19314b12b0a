"""History attention (ARD, docs/history.md): a few-step student whose lower blocks attend to the keys and values
of its own earlier steps.

* :mod:`ditfx.history.masks`: the training forward's block-causal and block-diagonal masks (flex_attention and SDPA);
* :mod:`ditfx.history.cost`: the history's FLOPs in closed form;
* :mod:`ditfx.history.oneshot`: the one-shot training forward (steps stacked along the batch);
* :mod:`ditfx.history.distill`: teacher trajectories and the teacher-forced distillation;
* :mod:`ditfx.history.student`: a distilled student (weights, step heads, schedule, record) in one file.

The inference pass is :mod:`ditfx.passes.history`, its policy :mod:`ditfx.runtime.history`
(``ditfx.Config(history=ditfx.HistoryAttention(layers=N))``, or ``student.history()``).
"""
from ditfx.history.cost import HistoryCost, history_flops
from ditfx.history.masks import block_causal, block_diagonal, block_mask, dense
from ditfx.history.distill import Trajectories, distill, record_trajectories
from ditfx.history.oneshot import one_shot
from ditfx.history.student import HistoryStudent

__all__ = ["HistoryCost", "HistoryStudent", "Trajectories", "block_causal", "block_diagonal", "block_mask", "dense",
           "distill", "history_flops", "one_shot", "record_trajectories"]
