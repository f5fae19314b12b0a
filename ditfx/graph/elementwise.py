"""Read the elementwise part of a Dynamo (Torch IR) graph into a sympy expression.

Starting from a root node, :func:`read_expression` walks back through elementwise arithmetic
(``+ - * /`` and negation, as ``operator.*``, ``torch.*`` or tensor methods) and through the views
that only lift a per-sample ``(B, D)`` vector to ``(B, 1, D)`` (``unsqueeze(1)``, ``v[:, None]``).
Every other value becomes an operand: a symbol with a broadcast kind relative to the root's
``(B, T, D)``: ``(B, T, D)`` is ``"full"``, ``(B, D)`` or ``(B, 1, D)`` ``"per_sample"``,
``(B, T, 1)`` ``"per_token"``, ``()`` ``"scalar"``.

These are exactly the operand kinds of :mod:`ditfx.kernels.codegen`, so the expression can be
printed into a kernel as it is. A value with any other shape (a ``(D,)`` weight, a 4-D tensor)
means the expression is not one the kernels can evaluate, and reading fails.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from ditfx.graph import meta

#: Dtypes a generated kernel loads (and computes in float32).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BINARY = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv, "div": operator.truediv,
}
_UNARY = {operator.neg: operator.neg, torch.neg: operator.neg, "neg": operator.neg}


class NotElementwise(Exception):
    """The expression reaches a value the kernels cannot take as an operand."""


@dataclass
class Operand:
    """A value the expression reads: graph node, symbol, broadcast kind."""

    node: fx.Node
    symbol: sympy.Symbol
    kind: str


@dataclass
class Expression:
    """``root``'s value as ``expr`` over ``operands``; ``nodes`` are what the expression replaces.

    ``nodes`` holds the root and every node read into the expression (each used only inside it),
    in graph order. ``normalized`` is the operand that stands for ``LayerNorm(operand)`` (the
    layer norm node itself is in ``nodes``), or None.
    """

    root: fx.Node
    expr: sympy.Expr
    operands: list[Operand]
    nodes: list[fx.Node]
    shape: tuple[int, int, int]
    normalized: Operand | None = None

    def kinds(self) -> dict[str, str]:
        return {op.symbol.name: op.kind for op in self.operands}


def _target_key(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def arithmetic(node: fx.Node):
    """The Python operator a node applies (``operator.add``, ...), or None.

    Only plain calls count: ``torch.add(a, b, alpha=2)`` or ``torch.div(..., rounding_mode=)``
    are not this arithmetic.
    """
    key = _target_key(node)
    if key is None or node.kwargs:
        return None
    try:
        if len(node.args) == 2 and key in _BINARY:
            return _BINARY[key]
        if len(node.args) == 1 and key in _UNARY:
            return _UNARY[key]
    except TypeError:  # unhashable target
        return None
    return None


def is_sample_lift(node: fx.Node) -> bool:
    """A view from ``(B, D)`` to ``(B, 1, D)`` that keeps element order (a per-sample vector lifted
    to broadcast over tokens): ``unsqueeze``, ``reshape``/``view``, or indexing with only ``:`` and
    ``None``."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    src, out = meta.tensor_value(node.args[0]), meta.tensor_value(node)
    if src is None or out is None or src.dim() != 2 or out.dim() != 3:
        return False
    B, D = src.shape
    if tuple(out.shape) != (B, 1, D):
        return False
    # With these shapes, unsqueeze/reshape/view can only insert the size-1 token axis.
    if node.target in ("unsqueeze", "reshape", "view", torch.unsqueeze, torch.reshape):
        return True
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    return False


def operand_kind(value: torch.Tensor, shape: tuple[int, int, int]) -> str | None:
    """The broadcast kind of ``value`` against a ``(B, T, D)`` root, or None."""
    B, T, D = shape
    dims = tuple(value.shape)
    if dims == (B, T, D):
        return "full"
    if dims in ((B, 1, D), (B, D)):
        return "per_sample"
    if dims == (B, T, 1):
        return "per_token"
    if dims == ():
        return "scalar"
    return None


def _number(a) -> sympy.Expr:
    # An integral float is the same number as the integer: x / 1.0 becomes x, 1.0 + s becomes
    # 1 + s, so equal expressions compare equal whichever spelling the model used.
    if isinstance(a, float) and a.is_integer():
        return sympy.Integer(int(a))
    return sympy.Integer(a) if isinstance(a, int) else sympy.Float(a)


def read_expression(root: fx.Node, normalized: fx.Node | None = None) -> Expression:
    """Read ``root`` as an elementwise expression; raise :class:`NotElementwise` if it is not one.

    Args:
        root: a node whose value is ``(B, T, D)``.
        normalized: a layer norm node inside the expression; it is read as the symbol ``x``
            standing for the normalisation of its input (the input becomes operand ``x``).

    Nodes with a single user are read into the expression; a node also used elsewhere must be
    computed anyway, so it is an operand. Operand symbols are named by kind and first use
    (``x`` the normalised input, ``y0..`` full, ``m0..`` per-sample, ``t0..`` per-token,
    ``c0..`` scalars), so structurally equal sites give equal expressions.
    """
    out = meta.tensor_value(root)
    if out is None or out.dim() != 3:
        raise NotElementwise(f"{root.name} is not a (B, T, D) tensor")
    shape = tuple(out.shape)
    # Keyed by (node, normalised): the normalised input and the same node read raw are two operands.
    operands: dict[tuple[fx.Node, bool], Operand] = {}
    inner: set[fx.Node] = {root}
    memo: dict[fx.Node, sympy.Expr] = {}
    counts: dict[str, int] = {}
    prefix = {"full": "y", "per_sample": "m", "per_token": "t", "scalar": "c"}

    def operand(node: fx.Node, normalised: bool = False) -> sympy.Symbol:
        if (node, normalised) in operands:
            return operands[node, normalised].symbol
        value = meta.tensor_value(node)
        kind = operand_kind(value, shape) if value is not None else None
        if kind is None or (normalised and kind != "full"):
            raise NotElementwise(f"{node.name} ({_describe(value)}) is not a (B, T, D) operand")
        if value.dtype not in KERNEL_DTYPES or value.device != out.device:
            raise NotElementwise(f"{node.name} is {value.dtype} on {value.device}")
        if normalised:
            name = "x"
        else:
            name = f"{prefix[kind]}{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        operands[node, normalised] = Operand(node, sympy.Symbol(name), kind)
        return operands[node, normalised].symbol

    def visit(a) -> sympy.Expr:
        if isinstance(a, bool) or not isinstance(a, (fx.Node, int, float)):
            raise NotElementwise(f"argument {a!r} is not a tensor or a number")
        if not isinstance(a, fx.Node):
            return _number(a)
        if a in memo:
            return memo[a]
        readable = a is root or len(a.users) == 1
        if a is normalized and readable:
            inner.add(a)
            memo[a] = operand(a.args[0], normalised=True)
        elif readable and (fn := arithmetic(a)) is not None and same_rank(a):
            inner.add(a)
            memo[a] = fn(*(visit(x) for x in a.args))
        elif readable and is_sample_lift(a):
            inner.add(a)
            memo[a] = visit(a.args[0])
        else:
            memo[a] = operand(a)
        return memo[a]

    expr = visit(root) if root is not normalized else None
    if expr is None or (root, False) in operands:
        raise NotElementwise(f"{root.name} is not elementwise arithmetic")
    norm = [o for (_, normalised), o in operands.items() if normalised]
    if normalized is not None and not norm:
        raise NotElementwise(f"{normalized.name} is not read into the expression at {root.name}")
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    # Operands in order of first use, the normalised input first: the layer-norm kernel template
    # normalises input 0.
    ops = sorted(operands.values(), key=lambda o: o.symbol.name != "x")
    return Expression(root, expr, ops, sorted(inner, key=order.get), shape, norm[0] if norm else None)


def same_rank(node: fx.Node) -> bool:
    """Operands broadcast as the kernels assume only when they have the node's rank (or are 0-d,
    or numbers): a (B, D) tensor meeting a (B, T, D) one would align D with D and B with T."""
    out = meta.tensor_value(node)
    if out is None:
        return False
    for a in node.args:
        v = meta.tensor_value(a) if isinstance(a, fx.Node) else None
        if isinstance(a, fx.Node) and (v is None or (v.dim() not in (0, out.dim()))):
            return False
    return True


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
