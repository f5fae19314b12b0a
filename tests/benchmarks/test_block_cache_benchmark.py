"""benchmarks/block_cache.py: its diffusers model for first-call comparisons, and what it refuses."""

import pytest
import torch

from ditfx.api import repeated_blocks


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("block_cache")


def test_flux_s_is_a_diffusers_flux_with_dit_s_width_and_depth(bench):
    named = bench.flux_s(batch=1)
    blocks = repeated_blocks(named.model)
    assert len(blocks) == 12
    assert sum(p.startswith("single_transformer_blocks.") for p in blocks) == 8
    assert named.model.inner_dim == 384
    with torch.no_grad():
        out = named(named.model)
    assert out.shape == named.inputs["hidden_states"].shape


def test_the_loops_refuse_flux_s(bench):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "flux-S"])
    assert e.value.code == 2
