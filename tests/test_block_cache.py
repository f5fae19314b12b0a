"""Block caching: skipped blocks are not computed, the plan is what runs, state never leaks."""
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditfx
from conftest import FAMILIES, between, run_loop, tiny_model
from ditfx.cache.policy import CachedValues
from ditfx.cache.schedule import CacheSchedule
from ditfx.runtime.rows import bucket, buckets

EAGER = "aot_eager"
# random tiny models change a lot between steps (relative L1 about 1): a threshold that skips some steps
SKIPPY = 1.3


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def calibrated(model, kw, steps=8, generations=1):
    return ditfx.calibrate(model, lambda m: run_loop(m, kw, "reference", steps), generations=generations)


def test_dynamic_cache_skips_and_skipped_blocks_are_not_computed():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler=EAGER))
    run_loop(fast, kw, "reference", steps=10)
    s = ditfx.stats(fast)
    assert s.block_evals_skipped > 0
    assert s.block_evals + s.block_evals_skipped == 10 * 4
    # the compiled block function ran exactly block_evals times: a skipped block is not run and discarded
    runtime = ditfx.api._runtime(fast)
    executor = runtime.executors[0]
    block_sigs = {rm.signature for rm in executor.plan.regions if rm.region.kind == "block"}
    # compiler keys are VariantKeys: (signature, transforms, rows)
    block_calls = sum(n for key, n in runtime.compiler.calls.items() if key.signature in block_sigs)
    assert block_calls == s.block_evals
    # FLOPs: the flop counter's per-block counts of one eager call, minus what was skipped
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**kw)
    per_block = counter.get_flop_counts()["DiT.blocks.0"]
    block_flops = sum(per_block.values())
    assert s.flops_skipped == s.block_evals_skipped * block_flops
    assert s.flops == 10 * counter.get_total_flops() - s.flops_skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_skips_blocks_at_a_large_threshold(family):
    """A threshold no change reaches: after the warmup step only the probe block (block 0) runs, on every
    family, and the output moves away from eager (the cached residuals really stand in for the blocks)."""
    model, kw = tiny_model(family)
    expected = run_loop(model, kw, family, steps=4)
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=1e9), compiler=EAGER))
    got = run_loop(fast, kw, family, steps=4)
    s = ditfx.stats(fast)
    n = len(ditfx.repeated_blocks(model))
    # the probe runs at all 4 steps, the other n - 1 blocks only at the warmup step
    assert s.block_evals == 4 + (n - 1) and s.block_evals_skipped == 3 * (n - 1)
    assert (got - expected).abs().max() > 1e-4


def test_calibration_and_static_plan_is_what_runs():
    model, kw = tiny_model("reference")
    schedule = calibrated(model, kw, steps=8, generations=2)
    assert schedule.blocks == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"] and schedule.steps == 8
    assert all(c[0] == 0 and all(v > 0 for v in c[1:]) for c in schedule.change)
    delta = between((v for c in schedule.change for v in c[1:]), len(schedule.change) * 4)
    plan = schedule.plan(delta)
    cache = ditfx.StaticCache(delta, schedule, per_block=True, forecast="none")
    fast = ditfx.optimize(model, ditfx.Config(cache=cache, compiler=EAGER))
    run_loop(fast, kw, "reference", steps=8)
    s = ditfx.stats(fast)
    assert s.block_evals == sum(map(sum, plan)) and 0 < s.block_evals_skipped
    # the schedule survives a round trip through JSON
    assert CacheSchedule.load(schedule.save(fast_path := __import__("pathlib").Path(
        __import__("tempfile").mkdtemp()) / "s.json")).plan(delta) == plan
    assert fast_path.exists()


def test_schedule_serves_another_step_count():
    model, kw = tiny_model("reference")
    schedule = calibrated(model, kw, steps=8)
    fine = [1 - k / 16 for k in range(16)]
    plan = schedule.plan(0.3, fine)
    assert len(plan[0]) == 16 and all(row[0] for row in plan)
    cache = ditfx.StaticCache(0.3, schedule, per_block=True, forecast="none")
    fast = ditfx.optimize(model, ditfx.Config(cache=cache, compiler=EAGER))
    run_loop(fast, kw, "reference", steps=16)
    assert ditfx.stats(fast).block_evals == sum(map(sum, plan))


DELTAS = (0, 0.01, 0.05, 0.1, 0.3, 1, 10)


def random_schedules(seed: int, count: int = 20):
    """Schedules of 5 blocks over 2 to 40 random decreasing times, with random change curves."""
    rng = random.Random(seed)
    for _ in range(count):
        steps = rng.randint(2, 40)
        times = sorted((rng.random() for _ in range(steps)), reverse=True)
        change = [[0.0] + [rng.random() * 0.3 for _ in range(steps - 1)] for _ in range(5)]
        yield CacheSchedule([f"b.{i}" for i in range(5)], times, change)


def test_larger_delta_never_schedules_more_recomputes():
    for schedule in random_schedules(0):
        counts = [sum(map(sum, schedule.plan(d))) for d in DELTAS]
        assert counts == sorted(counts, reverse=True)
        assert counts[0] == 5 * schedule.steps


def test_blocks_together_recompute_at_the_same_steps():
    for schedule in random_schedules(1):
        plans = [schedule.plan(d, per_block=False) for d in DELTAS]
        assert all(len(set(column)) == 1 for plan in plans for column in zip(*plan))  # all blocks or none
        counts = [sum(map(sum, plan)) for plan in plans]
        assert counts == sorted(counts, reverse=True) and counts[0] == 5 * schedule.steps
    model, kw = tiny_model("reference")
    schedule = calibrated(model, kw, steps=8)
    delta = between((v for c in schedule.change for v in c[1:]), len(schedule.change) * 4)
    plan = schedule.plan(delta, per_block=False)
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.StaticCache(delta, schedule, per_block=False),
                                              compiler=EAGER))
    run_loop(fast, kw, "reference", steps=8)
    s = ditfx.stats(fast)
    assert s.block_evals == sum(map(sum, plan)) and s.block_evals_skipped > 0


def test_linear_forecast_extrapolates_a_linear_trajectory():
    """Values that move linearly in time, per sample: two computed steps forecast any later time exactly, and a
    sample that did not compute keeps its own last time and slope."""
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    value = lambda t: [a + b * t]  # noqa: E731
    entry = CachedValues.first(value(1.0), 1.0, "linear")
    assert torch.equal(entry.reuse([], 0.5, residual=False)[0], value(1.0)[0])  # one point: reused as it is
    entry.update(value(0.8), 0.8)
    torch.testing.assert_close(entry.reuse([], 0.3, residual=False)[0], value(0.3)[0])
    entry.update([value(0.6)[0] + 1.0], 0.6, computed=torch.tensor([True, False]))
    assert entry.time.tolist() == pytest.approx([0.6, 0.8])
    # sample 1 still on its line
    torch.testing.assert_close(entry.reuse([], 0.2, residual=False)[0][1], value(0.2)[0][1])
    torch.testing.assert_close(entry.reuse([], 0.6, residual=False)[0][0], value(0.6)[0][0] + 1.0)
    plain = CachedValues.first(value(1.0), 1.0, "none")
    plain.update(value(0.8), 0.8)
    assert torch.equal(plain.reuse([], 0.3, residual=False)[0], value(0.8)[0])


def test_linear_forecast_moves_only_reused_blocks():
    model, kw = tiny_model("reference")
    schedule = calibrated(model, kw, steps=8)
    delta = between((v for c in schedule.change for v in c[1:]), len(schedule.change) * 4)
    runs = {}
    for forecast in ("none", "linear"):
        cache = ditfx.StaticCache(delta, schedule, per_block=True, forecast=forecast)
        fast = ditfx.optimize(model, ditfx.Config(cache=cache, compiler=EAGER))
        runs[forecast] = (run_loop(fast, kw, "reference", steps=8), ditfx.stats(fast).block_evals)
    assert runs["none"][1] == runs["linear"][1] < 8 * 4
    assert (runs["none"][0] - runs["linear"][0]).abs().max() > 1e-4


def test_fifty_steps_no_graph_breaks_no_recompiles():
    from torch._dynamo.utils import counters

    model, kw = tiny_model("dit")
    counters.clear()
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler=EAGER))
    x = kw["hidden_states"]
    with torch.no_grad():
        for k in range(50):
            t = torch.full((x.shape[0],), 1000.0 * (1 - k / 50))
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                x = x - fast(**{**kw, "hidden_states": x, "timestep": t}, return_dict=False)[0] / 50
    s = ditfx.stats(fast)
    assert sum(counters["graph_break"].values()) == 0 and s.graph_breaks == 0
    assert s.recompiles == 0 and s.graphs == 1 and s.steps == 50 and s.block_evals_skipped > 0


def test_steps_are_found_from_the_timestep():
    """The fallback: a timestep that goes up starts a generation; a repeat with the same latents is the other
    branch of two-call guidance."""
    from ditfx.runtime.lifecycle import Lifecycle

    lifecycle = Lifecycle()
    x = {t: torch.full((1,), float(t)) for t in (1000, 800, 600)}
    seen = [lifecycle.observe(t, x[t]) for t in (1000, 1000, 800, 800, 600, 600, 1000, 1000, 800)]
    assert [(s.generation, s.step, s.branch) for s in seen] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0)]


def test_two_generations_equal_two_fresh_runs():
    model, kw = tiny_model("reference")
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler=EAGER)
    fast = ditfx.optimize(model, config)
    first, second = run_loop(fast, kw, "reference"), run_loop(fast, kw, "reference")
    assert ditfx.stats(fast).block_evals_skipped > 0
    fresh = run_loop(ditfx.optimize(model, config), kw, "reference")
    assert torch.equal(first, second) and torch.equal(first, fresh)


def test_generation_context_frees_state():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler=EAGER))
    with ditfx.generation(fast):
        run_loop(fast, kw, "reference", steps=4)
        store = ditfx.api._runtime(fast).store()
        assert store._values
    assert not store._values


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_batch_equals_each_sample_alone_with_per_sample_policy(forecast):
    model, kw = tiny_model("reference", batch=2)
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY, forecast=forecast), compiler=EAGER)
    both = run_loop(ditfx.optimize(model, config), kw, "reference", steps=10)
    for i in range(2):
        alone_kw = {k: v[i:i + 1] for k, v in kw.items()}
        alone = run_loop(ditfx.optimize(model, config), alone_kw, "reference", steps=10)
        assert (both[i:i + 1] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_mixed_batch_computes_only_the_rows_that_need_the_blocks(forecast):
    """Where samples of a batch decide differently, the middle blocks run on a re-batched graph of the computing
    rows (padded to a bucket) and the others take their cached residuals: each sample still equals its run alone,
    and the FLOPs count only the rows run."""
    model, kw = tiny_model("reference", batch=4)
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=1.5, forecast=forecast), compiler=EAGER)
    fast = ditfx.optimize(model, config)
    batch = run_loop(fast, kw, "reference", steps=10)
    executor = ditfx.api._runtime(fast).executors[0]
    assert (("cache.residual",), 1) in {(key.transforms, key.rows) for key in executor.plan.built()}  # 1 row of 4
    s = ditfx.stats(fast)
    full = s.flops + s.flops_skipped
    assert full == ditfx.stats(fast).calls * sum(executor.plan.flops.values())
    for i in range(4):
        alone_kw = {k: v[i:i + 1] for k, v in kw.items()}
        alone = run_loop(ditfx.optimize(model, config), alone_kw, "reference", steps=10)
        assert (batch[i:i + 1] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("k,n,size", [(0, 4, 0), (1, 4, 1), (3, 4, 3), (4, 4, 4), (20, 200, 25), (26, 200, 50),
                                      (101, 200, 125), (176, 200, 200), (1, 1, 1), (6, 12, 6), (7, 12, 8),
                                      (5, 10, 6)])
def test_one_bucket_rule_for_row_subsets(k, n, size):
    """Row counts are multiples of ceil(rows / 8), at most the captured rows: guidance's partial calls
    (B cond rows plus the active uncond rows of 2B) and a per-sample cache's subsets use the same few sizes."""
    assert bucket(k, n) == size
    assert size in buckets(n) or size == 0
    assert len(buckets(n)) <= 8 and buckets(n)[-1] == n


def test_named_branches_keep_one_state_each():
    """Two calls per step that a pipeline names (``cache_context("cond")`` / ``("uncond")``) each keep their own
    caches, even when their latents differ: the same as two separate runs."""
    model, kw = tiny_model("flux", batch=1)
    _, other = tiny_model("flux", batch=1, seed=1)
    other = {**kw, "hidden_states": other["hidden_states"]}
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler=EAGER)
    fast = ditfx.optimize(model, config)
    scale = 1.0  # flux's timestep is a sigma in [0, 1]
    x1, x2 = kw["hidden_states"], other["hidden_states"]
    with torch.no_grad(), ditfx.generation(fast):
        for k in range(6):
            t = torch.full((1,), scale * (1 - k / 6))
            with fast.cache_context("cond"):
                x1 = x1 - fast(**{**kw, "hidden_states": x1, "timestep": t}, return_dict=False)[0] / 6
            with fast.cache_context("uncond"):
                x2 = x2 - fast(**{**other, "hidden_states": x2, "timestep": t}, return_dict=False)[0] / 6
    s = ditfx.stats(fast)
    assert (s.steps, s.calls, s.generations) == (6, 12, 1) and s.block_evals_skipped > 0
    torch._dynamo.reset()
    alone = run_loop(ditfx.optimize(model, config), other, "flux", steps=6)
    assert (x2 - alone).abs().max() <= 1e-5
