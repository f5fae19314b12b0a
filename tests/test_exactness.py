"""Approximations off reproduce eager (fp32, max abs error <= 1e-5) on every family, batched CFG included."""
import pytest
import torch

import ditfx
from conftest import FAMILIES, call, run_loop, tiny_model
from ditfx.runtime.schedule import CacheSchedule

TOL = 1e-5


def flat_schedule(model, steps=8) -> CacheSchedule:
    blocks = ditfx.repeated_blocks(model)
    times = [1 - k / steps for k in range(steps)]
    return CacheSchedule(blocks=blocks, times=times, change=[[0.0] + [0.05] * (steps - 1) for _ in blocks])


def exact_configs(model):
    yield ditfx.Config(compiler="aot_eager")
    yield ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0, forecast="linear"), compiler="aot_eager")
    yield ditfx.Config(cache=ditfx.StaticCache(delta=0.0, schedule=flat_schedule(model), per_block=False,
                                               forecast="linear"), compiler="aot_eager")


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_limit_over_a_loop_with_batched_cfg(family):
    """A batch of 4 = two CFG pairs (uncond half first), 8 steps: every exact config equals eager."""
    model, kw = tiny_model(family, batch=4)
    expected = run_loop(model, kw, family)
    for config in exact_configs(model):
        fast = ditfx.optimize(model, config)
        got = run_loop(fast, kw, family)
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"{family} {config.cache}: max abs error {err}"
        s = ditfx.stats(fast)
        assert s.block_evals_skipped == 0 and s.steps == 8 and s.generations == 1
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["reference", "dit"])
def test_output_mode_exact_limit(family):
    model, kw = tiny_model(family)
    expected = run_loop(model, kw, family)
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(0.0, mode="output"), compiler="aot_eager"))
    assert (run_loop(fast, kw, family) - expected).abs().max() <= TOL
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["reference", "dit"])
def test_inductor_regions_match_eager(family):
    """Integration through Inductor (CPU C++ codegen is slow, so only the smallest models). diffusers' DiT hands
    block 0 a transposed view from the uncompiled prologue and later blocks contiguous tensors: one artifact
    must serve both."""
    model, kw = tiny_model(family)
    with torch.no_grad():
        expected = call(model, kw, family)
        fast = ditfx.optimize(model, ditfx.Config(compiler="inductor"))
        got = call(fast, kw, family)
    assert (got - expected).abs().max() <= TOL
    s = ditfx.stats(fast)
    assert s.region_compiles == 1  # one block artifact shared by all four; prologue and epilogue run as FX
    torch._dynamo.reset()


def test_compile_all_regions_compiles_prologue_and_epilogue():
    model, kw = tiny_model("reference")
    with torch.no_grad():
        expected = call(model, kw, "reference")
        fast = ditfx.optimize(model, ditfx.Config(compiler="aot_eager", compile_regions="all"))
        got = call(fast, kw, "reference")
    assert (got - expected).abs().max() <= TOL
    assert ditfx.stats(fast).region_compiles == 3  # prologue, one block shared by all four, epilogue
    torch._dynamo.reset()
