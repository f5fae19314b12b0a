"""Public API: configuration errors come first and clearly, fallbacks warn, the named backend works."""
import warnings

import pytest
import torch

import ditfx
from conftest import call, tiny_model
from ditfx.cache.schedule import CacheSchedule


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make, match", [
    (lambda: ditfx.DynamicCache(threshold=-0.1), "threshold must be >= 0"),
    (lambda: ditfx.DynamicCache(threshold=0.1, first=0), "first must be >= 1"),
    (lambda: ditfx.DynamicCache(threshold=0.1, max_reuse=0), "max_reuse"),
    (lambda: ditfx.DynamicCache(threshold=0.1, mode="both"), "cache mode"),
    (lambda: ditfx.DynamicCache(threshold=0.1, forecast="quadratic"), "cache forecast must be 'none'"),
    (lambda: ditfx.Config(compiler="tvm"), "unknown inner backend 'tvm'"),
    (lambda: ditfx.Config(cache="fast"), "Config.cache must be"),
    (lambda: ditfx.StaticCache(delta=-1, schedule="x.json"), "delta must be >= 0"),
    (lambda: ditfx.StaticCache(delta=0.1, schedule="/nonexistent/schedule.json"), "ditfx calibrate"),
    (lambda: ditfx.Config.from_options({"threshold": 0.1}), "unknown ditfx option"),
])
def test_bad_config_is_a_clear_error(make, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make()


def test_schedule_for_another_model_fails_before_compiling():
    model, _ = tiny_model("reference")
    schedule = CacheSchedule(blocks=[f"transformer_blocks.{i}" for i in range(28)], times=[1.0, 0.5],
                             change=[[0.0, 0.1]] * 28)
    with pytest.raises(ValueError, match="calibrated for a model with 28 blocks"):
        ditfx.optimize(model, ditfx.Config(cache=ditfx.StaticCache(0.1, schedule)))


def test_no_middle_blocks_is_a_clear_error():
    model, kw = tiny_model("reference")
    with pytest.raises(ValueError, match="leaves no middle blocks"):  # in optimize(), before compiling
        ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(0.1, first=2, last=2), compiler="eager"))


def test_optimize_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="nn.Module"):
        ditfx.optimize(object())
    with pytest.raises(ValueError, match="not optimized by ditfx"):
        ditfx.stats(torch.nn.Linear(2, 2))


def test_backend_by_name_with_options():
    model, kw = tiny_model("dit")
    with torch.no_grad():
        expected = call(model, kw, "dit")
        compiled = torch.compile(model, backend="ditfx",
                                 options={"compiler": "eager", "cache": {"kind": "dynamic", "threshold": 0.0}})
        got = call(compiled, kw, "dit")
    assert (got - expected).abs().max() <= 1e-5
    assert ditfx.stats(model).calls == 1


def test_graph_without_blocks_falls_back_with_a_warning():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(2, 3, 8)
    fast = ditfx.optimize(mlp, ditfx.Config(compiler="eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(x)
    assert any("without ditfx passes" in str(w.message) for w in caught)
    assert torch.allclose(got, mlp(x))
    assert ditfx.stats(fast).graphs_without_ditfx == 1 and ditfx.api._runtime(fast).fallbacks


def test_pipeline_transformer_is_compiled_in_place():
    model, kw = tiny_model("dit")

    class Pipe:  # the one thing optimize needs from a diffusers pipeline
        transformer = model

    pipe = Pipe()
    assert ditfx.optimize(pipe, ditfx.Config(compiler="eager")) is pipe
    with torch.no_grad():
        call(pipe.transformer, kw, "dit")
    assert ditfx.stats(pipe).calls == 1


def test_the_reference_dit_names_a_wrong_latent_size():
    from ditfx.models import zoo

    named = zoo.load("DiT-T/2")
    fast = ditfx.optimize(named.model, ditfx.Config(compiler="eager"))
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\), got \(2, 4, 32, 32\)"):
        fast(torch.randn(2, 4, 32, 32), torch.full((2,), 500.0), torch.tensor([1, 2]))


def test_configs_holding_tensors_compare_by_value_after_a_round_trip(tmp_path):
    from ditfx.models import digits

    heads = {"weight": torch.randn(4, 3, 5), "bias": torch.randn(4, 3)}
    configs = [ditfx.Config(history=ditfx.HistoryAttention(2, 4, heads=heads)),
               ditfx.Config(budget=ditfx.TokenBudget(adapter=digits.budget_adapter(), weak_until=0.5))]
    for k, config in enumerate(configs):
        path = tmp_path / f"c{k}.json"
        config.save(path)
        back = ditfx.Config.load(path)
        assert back == config and not back != config
    other = ditfx.Config(history=ditfx.HistoryAttention(2, 4, heads={**heads, "bias": heads["bias"] + 1}))
    assert other != configs[0] and configs[0] != configs[1]
    assert hash(ditfx.HistoryAttention(2, 4, heads=heads)) == hash(ditfx.HistoryAttention(2, 4, heads=heads))
