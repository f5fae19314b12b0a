"""FLOP cost model of graph nodes: matrix products, convolutions and attention, as torch's flop counter counts
them (2 FLOPs per multiply-add; elementwise work is not counted).

Shapes may be symbolic (SymInts of a dynamic ``torch.export`` graph): the result is then a sympy expression in
the graph's size symbols, so budgets and speed-ups can be solved on it.
"""
from __future__ import annotations

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
    return 0


def graph_flops(nodes) -> sympy.Expr | int:
    """Total FLOPs of a sequence of nodes."""
    return sum((node_flops(n) for n in nodes), start=0)
