"""ditfx.kernels.expression: text round trip (exact floats), safe parsing, torch evaluation."""

import pytest
import sympy
import torch

from ditfx.kernels.expression import evaluate, parse, to_text

x, s, h = sympy.symbols("x s h")


@pytest.mark.parametrize(
    "expr",
    [
        x * (1 + s) + h,
        sympy.Float(0.7978845608028654) * x - h / 3 + sympy.Float(4.451311244476786e-09) * s,
        sympy.tanh(x) ** 2 + sympy.exp(-sympy.Abs(h)) / sympy.sqrt(s**2 + 1),
    ],
)
def test_text_round_trip_is_exact(expr):
    assert parse(to_text(expr), ["x", "s", "h"]) == expr


@pytest.mark.parametrize(
    "text", ["__import__('os')", "x.__class__", "x + y", "open('f')", "lambda: 1"]
)
def test_parse_rejects_what_is_not_arithmetic_over_the_inputs(text):
    with pytest.raises((ValueError, TypeError, NameError, SyntaxError)):
        parse(text, ["x"])


def test_evaluate_matches_torch():
    g = torch.Generator().manual_seed(0)
    xt, st, ht = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    expr = x * (1 + s) + h - x**2 / sympy.sqrt(s**2 + 1) + sympy.tanh(h) * sympy.exp(-sympy.Abs(x))
    expected = (xt * (1 + st) + ht - xt**2 / torch.sqrt(st**2 + 1)
                + torch.tanh(ht) * torch.exp(-xt.abs()))
    torch.testing.assert_close(evaluate(expr, {"x": xt, "s": st, "h": ht}), expected)
