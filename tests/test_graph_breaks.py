"""Models Dynamo splits into several graphs (diffusers' Lumina2 breaks at ``attention_mask.sum(1).tolist()``):
the graph that holds the blocks is optimised, the pieces without blocks run compiled as they are, and nothing
raises or runs wrongly."""
import warnings

import pytest
import torch

import ditfx
from ditfx.models import zoo

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def generate(named, config, steps=4):
    fast = ditfx.optimize(named.model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ditfx.generation(fast):
            got = zoo.run_loop(named, fast, steps=steps)
    return got, fast, [str(w.message) for w in caught if str(w.message).startswith("ditfx")]


def test_lumina2_caches_the_blocks_graph_and_the_pieces_warn_once():
    named = zoo.load("tiny:lumina2")
    expected = zoo.run_loop(named, steps=4)
    got, fast, warned = generate(named, ditfx.Config(cache=ditfx.DynamicCache(0.0), compiler="eager"))
    s = ditfx.stats(fast)
    assert (got - expected).abs().max() <= TOL and s.block_evals_skipped == 0 and s.graph_breaks > 0
    assert len([w for w in warned if "graph break" in w]) == 1, warned
    torch._dynamo.reset()
    got, fast, _ = generate(named, ditfx.Config(cache=ditfx.DynamicCache(1e9), compiler="eager"))
    s = ditfx.stats(fast)
    assert s.block_evals_skipped > 0 and (got - expected).abs().max() > 1e-4
    # the caption refiner (text tokens only) neither probes nor is skipped: it runs at every step
    (executor,) = ditfx.api._runtime(fast).executors
    regions = executor.plan.structure.block_regions
    text_only = [r for r in regions if not r.latent_stream]
    assert text_only and s.block_evals == 4 * (len(text_only) + 1) + (len(regions) - len(text_only) - 1)

def test_data_dependent_capture_falls_back_with_a_warning():
    named = zoo.load("tiny:lumina2")
    expected = zoo.run_loop(named, steps=3)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        got, _, warned = generate(named, ditfx.Config(cache=ditfx.DynamicCache(0.5), compiler="eager"), steps=3)
    assert (got - expected).abs().max() <= TOL
    assert warned and all("without ditfx passes" in w for w in warned)


def test_backend_by_name_warns_when_a_second_batch_size_turns_dynamic():
    named = zoo.load("DiT-T/2", batch=2)
    fast = torch.compile(named.model, backend="ditfx", options={"compiler": "eager"})
    kw = named.inputs
    with torch.no_grad():
        fast(**kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(3, *kw["x"].shape[1:])
            fast(x, torch.full((3,), 500.0), torch.tensor([1, 2, 3]))
    assert any("pass dynamic=False to torch.compile" in str(w.message) for w in caught)
