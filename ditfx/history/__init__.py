"""History attention (ARD, docs/history.md): a few-step student whose lower blocks attend to the keys and values
of its own earlier steps.

* :mod:`ditfx.history.config`: the knobs, :class:`HistoryAttention`;
* :mod:`ditfx.history.student`: :class:`HistoryStudent`, a distilled student (weights, step heads, schedule,
  record) in one file;
* :mod:`ditfx.history.variants`: the pass: each step's variant of the lower blocks (static key/value buffer) and
  the step heads' epilogue;
* :mod:`ditfx.history.policy`: the policy that writes each step's keys and values and reads the earlier ones;
* :mod:`ditfx.history.masks`: the training forward's block-causal and block-diagonal masks (flex_attention and
  SDPA);
* :mod:`ditfx.history.cost`: the history's FLOPs in closed form;
* :mod:`ditfx.history.oneshot`: the one-shot training forward (steps stacked along the batch);
* :mod:`ditfx.history.distillation`: teacher trajectories and the teacher-forced distillation.

``ditfx.Config(history=ditfx.HistoryAttention(layers=N))``, or ``student.history()``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import ditfx.history.policy  # noqa: F401  (registers the policy of its config)
from ditfx.history import variants
from ditfx.history.config import HistoryAttention
from ditfx.history.cost import HistoryCost, history_flops
from ditfx.history.masks import block_causal, block_diagonal, block_mask, dense
from ditfx.history.student import HistoryStudent
from ditfx.lazy import lazy_names
from ditfx.technique import Technique

if TYPE_CHECKING:
    from ditfx.history.distillation import Trajectories, distill, record_trajectories
    from ditfx.history.oneshot import one_shot

TECHNIQUE = Technique(
    name="history", configs=(HistoryAttention,), offer=variants.offer, order=1,
    example="ditfx.HistoryAttention(layers=2, steps=4)", options={"history": HistoryAttention},
    option_examples={"history": "{'layers': 2, 'steps': 4}"},
    conflicts={"cache": "a block the cache skips computes no keys and values for the history"},
)

# Imported on first access (PEP 562): training drives torch.compile and flex_attention.
__getattr__, __dir__ = lazy_names(__name__, {
    **{name: ("ditfx.history.distillation", name) for name in ("Trajectories", "distill", "record_trajectories")},
    "one_shot": ("ditfx.history.oneshot", "one_shot"),
})


__all__ = ["TECHNIQUE", "HistoryAttention", "HistoryCost", "HistoryStudent", "Trajectories", "block_causal",
           "block_diagonal", "block_mask", "dense", "distill", "history_flops", "one_shot", "record_trajectories"]
