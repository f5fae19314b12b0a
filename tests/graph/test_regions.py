"""Region extraction: signatures, lazily built region graphs, and one cache variant per block structure."""
import pytest
import torch
from test_structure import dynamo_graph

import ditfx
from conftest import FAMILIES, call, tiny_model
from ditfx.config import Config, DynamicCache
from ditfx.graph.regions import extract, signature
from ditfx.graph.structure import analyse
from ditfx.passes.manager import build_plan


@pytest.mark.parametrize("family", FAMILIES)
def test_a_region_hashes_alike_before_and_after_extraction(family):
    """The signature is computed from the region's nodes without building its graph; it must equal the one of
    the built graph, or a region could share another structure's compiled artifact."""
    model, kw = tiny_model(family)
    s = analyse(dynamo_graph(model, kw, family))
    for r in s.regions:
        rm = extract(s.gm, r)
        assert rm.signature == signature(rm.gm), r.name


def test_blocks_of_one_structure_build_one_graph_and_share_its_cache_variant():
    model, kw = tiny_model("reference")
    gm = dynamo_graph(model, kw, "reference")
    plan = build_plan(gm, Config(cache=DynamicCache(0.1)))
    blocks = [rm for rm in plan.regions if rm.region.kind == "block"]
    assert len({rm.signature for rm in blocks}) == 1
    # the cache pass needed one block's graph, not all four
    assert [rm._gm is not None for rm in blocks] == [True, False, False, False]
    residuals = [key for key in plan.built() if key.transforms == ("cache.residual",)]
    assert len(residuals) == 1


def test_an_optimized_model_builds_the_graphs_it_runs_once_per_signature():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, Config(compiler="aot_eager"))
    with torch.no_grad():
        expected = call(model, kw, "reference")
        out = call(fast, kw, "reference")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    (executor,) = ditfx.api._runtime(fast).executors
    built = [rm.region.name for rm in executor.plan.regions if rm._gm is not None]
    assert built == ["prologue", "block.0", "epilogue"]
    assert ditfx.stats(fast).region_compiles == 1
