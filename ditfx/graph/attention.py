"""Attention-call sites of a captured graph: scaled-dot-product attention calls, their query, key and value
(positional or by keyword, as diffusers' attention dispatch passes them), and which of them are self-attention
over a region's own token stream."""
from __future__ import annotations

import torch.fx as fx

from ditfx.graph import meta

QKV = ("query", "key", "value")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "enable_gqa": False}


def is_sdpa(n: fx.Node) -> bool:
    """A scaled-dot-product attention call (Torch IR or ATen), not its backward."""
    name = meta.target_name(n)
    return n.op == "call_function" and "scaled_dot_product" in name and "backward" not in name


def sdpa_qkv(n: fx.Node) -> tuple:
    """(q, k, v) of an attention call, positional or by keyword (diffusers' dispatch passes them by name)."""
    return tuple(n.args[i] if i < len(n.args) else n.kwargs.get(name) for i, name in enumerate(QKV))


def positional_qkv(n: fx.Node) -> None:
    """Rewrite the call so q, k, v are its first three positional arguments."""
    n.args = (*sdpa_qkv(n), *n.args[3:])
    n.kwargs = {k: v for k, v in n.kwargs.items() if k not in QKV}


def plain_attention(n: fx.Node) -> bool:
    """``sdpa(q, k, v)`` with no mask, dropout or causal flag (the defaults spelled out are fine); a scale is."""
    return len(n.args) <= 3 and all(k in QKV or k == "scale" or (k in _DEFAULTS and v == _DEFAULTS[k])
                                    for k, v in n.kwargs.items())


def self_attention_sites(gm: fx.GraphModule, stream: fx.Node) -> list[fx.Node]:
    """The attention calls of ``gm`` whose queries and keys are computed from ``stream`` (self-attention over
    the token stream, or joint text + image attention; cross-attention to the text alone is not)."""
    depends = meta.dependents(gm.graph, [stream])
    return [n for n in gm.graph.nodes if is_sdpa(n) and sdpa_qkv(n)[1] in depends and sdpa_qkv(n)[0] in depends]
