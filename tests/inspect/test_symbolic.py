"""Symbolic region FLOPs in batch and tokens: named symbols, and equal to the numeric cost model at the
model's own sizes (which equals torch.utils.flop_counter, see tests/graph/test_cost.py)."""
import pytest
import sympy
import torch

import ditfx
from ditfx.graph.capture import capture
from ditfx.inspect.symbolic import symbolic_flops
from ditfx.models import zoo
from ditfx.passes.manager import build_plan


@pytest.mark.parametrize("name, sizes", [
    ("DiT-T/2", {"B": 3, "H": 8, "W": 8}),
    ("tiny:flux", {"B": 3, "T": 16, "L": 5}),
])
def test_symbolic_flops_are_named_and_match_the_numeric_cost(name, sizes):
    named = zoo.load(name, batch=3)
    symbolic = symbolic_flops(named)
    assert isinstance(symbolic, dict), symbolic
    exprs = {region: sympy.sympify(text) for region, text in symbolic.items()}
    assert set().union(*(e.free_symbols for e in exprs.values())) == {sympy.Symbol(s) for s in sizes}
    plan = build_plan(capture(named.model, fullgraph=True, call=named)[0], ditfx.Config())
    for region, expr in exprs.items():
        assert int(expr.subs({sympy.Symbol(k): v for k, v in sizes.items()})) == plan.flops[region], region
    torch._dynamo.reset()
