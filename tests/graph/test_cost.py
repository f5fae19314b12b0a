"""The cost model agrees with torch.utils.flop_counter, region by region summed over the model."""
import pytest
import torch
from graph.test_structure import dynamo_graph
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import FAMILIES, call, tiny_model
from ditfx.graph.cost import graph_flops
from ditfx.graph.structure import analyse


@pytest.mark.parametrize("family", FAMILIES)
def test_region_flops_sum_to_counted_flops(family):
    model, kw = tiny_model(family)
    s = analyse(dynamo_graph(model, kw, family))
    ours = sum(int(graph_flops(r.nodes)) for r in s.regions)
    # the math backend runs attention as matmuls, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        call(model, kw, family)
    assert ours == counter.get_total_flops()


def test_symbolic_flops_from_a_dynamic_export():
    import sympy

    from ditfx.graph.cost import node_flops

    model, kw = tiny_model("reference")
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (), kw, dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}})
    total = sum((node_flops(n) for n in ep.graph.nodes), start=0)
    assert isinstance(total, sympy.Expr) and total.free_symbols
    (sym,) = total.free_symbols
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**kw)
    assert int(total.subs(sym, kw["x"].shape[0])) == counter.get_total_flops()
