"""The FLOPs of history attention (ARD), in closed form (shared/research/methods.md 4.4).

With a key/value history, step s (0-based) of S attends in each of the lower N layers to s earlier steps' keys on
top of its own: the extra work is the extra ``Q K^T`` and ``A V`` products, ``4 s L_tok^2 D`` per layer. The base
cost of a DiT call is ``L (24 L_tok D^2 + 4 L_tok^2 D)`` (linear layers: qkv, projection, 4x MLP; attention).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HistoryCost:
    extra: int  # FLOPs the history adds over a generation
    base: int  # FLOPs of the generation without history
    ratio: float  # extra / base


def history_flops(steps: int, tokens: int, width: int, depth: int, history_layers: int) -> HistoryCost:
    """FLOPs of ``steps`` student steps of a DiT of ``depth`` blocks of width ``width`` on ``tokens`` tokens, whose
    lower ``history_layers`` blocks attend to the earlier steps' keys and values."""
    for name, value in (("steps", steps), ("tokens", tokens), ("width", width), ("depth", depth)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= history_layers <= depth:
        raise ValueError(f"history_layers must be in [0, depth={depth}], got {history_layers}")
    extra = history_layers * sum(4 * s * tokens ** 2 * width for s in range(steps))
    base = steps * depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)
    return HistoryCost(extra, base, extra / base)
