"""FLOP cost model of graph nodes: matrix products, convolutions and attention, as torch's flop counter counts
them (2 FLOPs per multiply-add; elementwise work is not counted).

Shapes may be symbolic (SymInts of a dynamic ``torch.export`` graph): the result is then a sympy expression in
the graph's size symbols, so budgets and speed-ups can be solved on it.
"""
from __future__ import annotations

import inspect
import math
import operator

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ditfx.graph import meta

aten = torch.ops.aten

_LINEAR = {F.linear, aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, aten.mm.default, aten.bmm.default,
           aten.matmul.default, "matmul", "mm", "bmm"}
_ADDMM = {torch.addmm, torch.baddbmm, aten.addmm.default, aten.baddbmm.default, "addmm", "baddbmm"}
_CONV = {torch.conv2d, torch.conv1d, torch.conv3d, F.conv2d, F.conv1d, F.conv3d,
         aten.convolution.default, aten.conv2d.default}


def _dim(s) -> sympy.Expr | int:
    if isinstance(s, torch.SymInt):
        return sympy.sympify(s.node.expr)
    return int(s)


def _numel(shape) -> sympy.Expr | int:
    return math.prod((_dim(s) for s in shape), start=1)


def _shape(a) -> tuple | None:
    v = meta.tensor_value(a) if isinstance(a, fx.Node) else None
    return tuple(v.shape) if v is not None else None


def node_flops(node: fx.Node) -> sympy.Expr | int:
    """FLOPs of one node (0 for ops the counter does not count)."""
    if node.op not in ("call_function", "call_method"):
        return 0
    t = node.target
    args = node.args
    out = _shape(node)
    if t in _LINEAR:
        x, w = _shape(args[0]), _shape(args[1] if len(args) > 1 else node.kwargs["weight"])
        if x is None or w is None:
            return 0
        return 2 * _numel(x[:-1]) * _dim(w[0]) * _dim(w[1])
    if t in _MATMUL or t in _ADDMM:
        a = _shape(args[1] if t in _ADDMM else args[0])
        if a is None or out is None:
            return 0
        return 2 * _numel(out) * _dim(a[-1])
    if t in _CONV:
        w = _shape(args[1])
        if w is None or out is None:
            return 0
        return 2 * _numel(out) * _numel(w[1:])
    if "scaled_dot_product" in meta.target_name(node) and "backward" not in meta.target_name(node):
        q, k, v = (_shape(args[i] if len(args) > i else node.kwargs.get(name))
                   for i, name in enumerate(("query", "key", "value")))
        if q is None or k is None or v is None:
            return 0
        batch_heads = _numel(q[:-2])
        return 2 * batch_heads * _dim(q[-2]) * _dim(k[-2]) * (_dim(q[-1]) + _dim(v[-1]))
    if t is F.multi_head_attention_forward:
        return _multi_head_attention_flops(node)
    return 0


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _multi_head_attention_flops(node: fx.Node) -> sympy.Expr | int:
    """``F.multi_head_attention_forward`` (nn.MultiheadAttention, attention pooling as in HunyuanDiT) is one
    node in a Dynamo graph: its q/k/v in-projections, two attention matmuls and out-projection, as the counter
    sees them after decomposition. Inputs are (length, batch, width) or unbatched (length, width)."""
    a = _MHA_SIGNATURE.bind(*node.args, **node.kwargs).arguments
    q, k = _shape(a["query"]), _shape(a["key"])
    if q is None or k is None:
        return 0
    if a.get("use_separate_proj_weight"):
        proj = [_shape(a[w]) for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    else:
        packed = _shape(a["in_proj_weight"])  # (3 * width, width): q, k and v weights stacked
        proj = [(packed[0] // 3, packed[1])] * 3 if packed is not None else [None] * 3
    out_w = _shape(a["out_proj_weight"])
    if None in proj or out_w is None:
        return 0
    q_tokens, kv_tokens = _numel(q[:-1]), _numel(k[:-1])  # length x batch
    batch = _dim(q[1]) if len(q) == 3 else 1
    source = _dim(k[0]) + (a.get("bias_k") is not None) + bool(a.get("add_zero_attn"))  # keys attended to
    width = _dim(proj[0][0])
    flops = 2 * q_tokens * _dim(proj[0][0]) * _dim(proj[0][1])
    flops += 2 * kv_tokens * (_dim(proj[1][0]) * _dim(proj[1][1]) + _dim(proj[2][0]) * _dim(proj[2][1]))
    # scores and weighted sum, over all heads together (how the width splits into heads does not matter)
    flops += 2 * 2 * batch * _dim(q[0]) * source * width
    flops += 2 * q_tokens * _dim(out_w[0]) * _dim(out_w[1])
    return flops


def graph_flops(nodes) -> sympy.Expr | int:
    """Total FLOPs of a sequence of nodes."""
    return sum((node_flops(n) for n in nodes), start=0)
