"""History attention's knobs: the config dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ditfx.validation import check_int, same_fields, set_field


@dataclass(frozen=True)
class HistoryAttention:
    """History attention (ARD): in the lower ``layers`` blocks, each call's self-attention also reads the keys and
    values of this generation's earlier calls, from a static buffer of ``steps`` steps per sample (a generation
    of at most ``steps`` steps; the buffer is freed when it ends). ``layers=0`` is the model without history.
    Meant for students distilled with it (``ditfx.models.digits.pipeline(student="ard")``); it cannot run with
    block caching (a skipped block computes no keys for the history)."""

    layers: int
    steps: int = 4
    # the step-specific output heads: {"weight": (S, out, in), "bias": (S, out)}
    heads: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    __eq__ = same_fields  # the heads are tensors

    def __hash__(self) -> int:
        return hash((self.layers, self.steps, self.heads is None))

    def __post_init__(self):
        o = "HistoryAttention"
        set_field(self, "layers", check_int(o, "layers", self.layers, 0, hint=" (0: no history)"))
        set_field(self, "steps", check_int(o, "steps", self.steps, 1, hint=" (the steps of history the buffer holds)"))
        if self.heads is not None:
            w, b = (self.heads.get(k) if isinstance(self.heads, dict) else None for k in ("weight", "bias"))
            if not (hasattr(w, "dim") and hasattr(b, "dim") and w.dim() == 3 and b.dim() == 2
                    and w.shape[0] == b.shape[0] == self.steps and w.shape[1] == b.shape[1]):
                raise ValueError("HistoryAttention.heads must be {'weight': (steps, out, in), 'bias': (steps, out)} "
                                 f"tensors, one output head per step ({self.steps})")
