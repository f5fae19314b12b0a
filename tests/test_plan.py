"""The Plan is data: built before the first call, saved and loaded (``ditfx.plan_io``), and a loaded plan runs
exactly."""
import pytest
import torch

import ditfx
from conftest import call, tiny_model
from ditfx.passes.manager import build_plan
from ditfx.plan import ModeKey, VariantKey
from ditfx.plan_io import load_plan, save_plan
from ditfx.runtime.compiler import RegionCompiler
from ditfx.runtime.executor import Executor
from ditfx.runtime.state import ModelRuntime


def captured(family, batch=2):
    model, kw = tiny_model(family, batch=batch)
    got = []

    def capture(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        call(torch.compile(model, backend=capture, fullgraph=True, dynamic=False), kw, family)
    torch._dynamo.reset()
    return got[0]


def executor(plan, inputs):
    runtime = ModelRuntime()
    runtime.compiler = RegionCompiler("eager")
    return Executor(plan, runtime, inputs, compile_edges=False)


def flat(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", ["reference", "flux"])
def test_a_saved_plan_loads_and_runs_exactly(family, tmp_path):
    gm, inputs = captured(family)
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=0.5), guidance=None)
    plan = build_plan(gm, config)
    with torch.no_grad():
        expected = flat(executor(plan, inputs)(*inputs))
        save_plan(plan, tmp_path)
        loaded = load_plan(tmp_path)
        got = flat(executor(loaded, inputs)(*inputs))
    assert torch.equal(got, expected) or (got - expected).abs().max() <= 1e-6
    assert loaded.policies == plan.policies and loaded.io.input_names == plan.io.input_names
    assert [rm.region.name for rm in loaded.regions] == [rm.region.name for rm in plan.regions]
    assert set(loaded.built()) >= {k for k in plan.built()}


def test_a_saved_plan_keeps_its_modes(tmp_path):
    """A token budget's weak mode is a plan of its own: saved beside the native one with its adapter tensors."""
    gm, inputs = captured("dit")
    config = ditfx.Config(budget=ditfx.TokenBudget(weak_until=1.0, time_scale=1.0))
    plan = build_plan(gm, config, example_inputs=inputs)
    with torch.no_grad():
        expected = flat(executor(plan, inputs)(*inputs))
        save_plan(plan, tmp_path)
        loaded = load_plan(tmp_path)
        got = flat(executor(loaded, inputs)(*inputs))
    p4 = ModeKey("budget", 4, "p4")  # a structured key: the technique that built the mode, its patch size
    assert set(loaded.modes) == {p4} and loaded.modes[p4].tokens == 4
    assert torch.equal(got, expected) or (got - expected).abs().max() <= 1e-6


def test_the_variant_table_is_keyed_by_structure_transforms_and_rows():
    gm, _ = captured("reference")
    plan = build_plan(gm, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    block = next(rm for rm in plan.regions if rm.region.kind == "block")
    assert plan.key(block, ("cache.residual",)) == VariantKey(block.signature, ("cache.residual",), 2)
    assert plan.blocks_offering("cache.residual") == [0, 1, 2, 3]
    assert plan.offers["block.0"] == {"cache.residual", "cache.probe"}
    assert plan.policies == [ditfx.DynamicCache(threshold=0.1)]


def test_a_loaded_plan_refuses_what_it_was_not_saved_with(tmp_path):
    from ditfx.plan import VariantUnavailable

    gm, _ = captured("reference", batch=4)
    plan = build_plan(gm, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    save_plan(plan, tmp_path)
    loaded = load_plan(tmp_path)
    block = next(rm for rm in loaded.regions if rm.region.kind == "block")
    with pytest.raises(VariantUnavailable):
        loaded.graph(block, loaded.key(block, ("cache.residual",), rows=2))


def test_broken_plan_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json"):
        load_plan(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="plan.json is not valid JSON"):
        load_plan(tmp_path)


def test_a_saved_plan_keeps_history_heads(tmp_path):
    gm, inputs = captured("reference")
    heads = {"weight": torch.randn(2, 32, 64), "bias": torch.randn(2, 32)}
    plan = build_plan(gm, ditfx.Config(history=ditfx.HistoryAttention(2, 2, heads=heads)), example_inputs=inputs)
    save_plan(plan, tmp_path)
    loaded = load_plan(tmp_path)
    assert torch.equal(loaded.policies[0].heads["weight"], heads["weight"])
