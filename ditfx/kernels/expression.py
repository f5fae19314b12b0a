"""Elementwise sympy expressions as text, and their evaluation with torch.

A fused-elementwise op carries its expression in the graph as a string (so an exported graph
describes itself). This module is the one place that turns an expression into that string and
back, and that evaluates it on tensors for the CPU path:

    text = to_text(x * (1 + scale) + shift)        # "shift + x*(scale + 1)"
    expr = parse(text, ["x", "scale", "shift"])      # the same sympy expression again
    out = evaluate(expr, {"x": xt, "scale": st, "shift": ht})

Floats print as Python's shortest round-trip ``repr`` and parse back to the same double, so
``parse(to_text(e)) == e`` for the expressions the fusion pass builds.
"""

import functools
import operator
import re
from collections.abc import Mapping, Sequence

import sympy
import torch
from sympy.parsing.sympy_parser import parse_expr
from sympy.printing.str import StrPrinter

# Text that can only be arithmetic over names and numbers: no attribute access, no dunders.
_SAFE_TEXT = re.compile(r"^[\w\s+\-*/(),.]*$")
_ATTRIBUTE = re.compile(r"\.\s*[A-Za-z_]|__")


class _TextPrinter(StrPrinter):
    def _print_Float(self, expr: sympy.Float) -> str:
        return repr(float(expr))


def to_text(expr: sympy.Expr) -> str:
    """The expression as text that :func:`parse` reads back exactly."""
    return _TextPrinter().doprint(expr)


@functools.lru_cache(maxsize=512)
def _parse(text: str, names: tuple[str, ...]) -> sympy.Expr:
    if not _SAFE_TEXT.match(text) or _ATTRIBUTE.search(text):
        raise ValueError(f"not an elementwise expression: {text!r}")
    symbols = {n: sympy.Symbol(n) for n in names}
    known = {
        "Integer": sympy.Integer,
        "Rational": sympy.Rational,
        # parse_expr wraps decimal literals in Float('...'); going through a Python float keeps
        # the exact double that was printed (a decimal Float would carry extra digits).
        "Float": lambda s: sympy.Float(float(s)),
        "Symbol": sympy.Symbol,
        "exp": sympy.exp,
        "tanh": sympy.tanh,
        "sqrt": sympy.sqrt,
        "Abs": sympy.Abs,
        "__builtins__": {},
    }
    expr = parse_expr(text, local_dict=symbols, global_dict=known)
    unknown = {s.name for s in expr.free_symbols} - set(names)
    if unknown:
        raise ValueError(f"expression {text!r} uses {sorted(unknown)}, not among inputs {names}")
    return expr


def parse(text: str, names: Sequence[str]) -> sympy.Expr:
    """Parse text written by :func:`to_text` over the given input names (cached)."""
    return _parse(text, tuple(names))


def evaluate(expr: sympy.Expr, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate ``expr`` on tensors (broadcasting as torch does); the printer's node set.

    Raises ``NotImplementedError`` for a node :mod:`ditfx.kernels.codegen` cannot print either.
    """
    if expr.is_Symbol:
        return values[expr.name]
    if expr.is_Number:
        return float(expr)
    args = [evaluate(a, values) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return functools.reduce(operator.add, args)
    if isinstance(expr, sympy.Mul):
        return functools.reduce(operator.mul, args)
    if isinstance(expr, sympy.Pow):
        base, e = args[0], expr.args[1]
        if e == sympy.Rational(1, 2):
            return torch.sqrt(base)
        if e == sympy.Rational(-1, 2):
            return torch.rsqrt(base)
        if e.is_Integer and e != 0:
            # Repeated multiplication, as the Triton printer emits it.
            power = functools.reduce(operator.mul, [base] * abs(int(e)))
            return power if e > 0 else 1.0 / power
    if isinstance(expr, sympy.exp):
        return torch.exp(args[0])
    if isinstance(expr, sympy.tanh):
        return torch.tanh(args[0])
    if isinstance(expr, sympy.Abs):
        return torch.abs(args[0])
    raise NotImplementedError(f"unsupported sympy node {type(expr).__name__}: {expr}")
