"""benchmarks/block_cache.py: its diffusers model for first-call comparisons, and what it refuses."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ditfx.api import repeated_blocks

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))  # as when run as a script: it imports reporting.py beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_block_cache", REPO / "benchmarks" / "block_cache.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


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
