"""Guidance skipping: exact limits on every family, NFE accounting, per-sample switching, LinearAG, windows."""
import math
import warnings

import pytest
import torch

import ditfx
from conftest import FAMILIES, between, cfg_loop, tiny_model
from ditfx.guidance import linear_ag

TOL = 1e-5
STEPS = 8


def optimized(model, guidance, cache=None):
    return ditfx.optimize(model, ditfx.Config(guidance=guidance, cache=cache, compiler="aot_eager"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


# LTX builds its rotary coordinates per sample from the batch size as a literal, not from the inputs, so its
# regions cannot be re-batched safely: guidance skipping computes every row there (same result, no saving).
NOT_REBATCHABLE = {"ltx"}


@pytest.mark.parametrize("family", FAMILIES)
def test_gamma_one_is_cfg_and_gamma_minus_one_is_one_cfg_step(family):
    """gamma = 1 never switches: exactly CFG. gamma = -1: one CFG step, then the conditional branch only, on the
    re-batched graph (B rows instead of 2B), with NFE = 2k + (T - k) for k = 1."""
    model, kw = tiny_model(family, batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=1.0))
    assert (cfg_loop(fast, kw, family) - cfg_loop(model, kw, family)).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 2 * STEPS
    torch._dynamo.reset()
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cfg_loop(fast, kw, family)
    refused = [w for w in caught if "cannot run this graph" in str(w.message)]
    assert (got - cfg_loop(model, kw, family, cfg_steps=1)).abs().max() <= TOL
    s = ditfx.stats(fast)
    if family in NOT_REBATCHABLE:
        assert refused and s.nfe == 2 * STEPS
    else:
        assert not refused, refused[0].message if refused else ""
        assert (s.nfe, s.nfe_skipped) == (2 * 1 + (STEPS - 1), STEPS - 1)
    assert s.graph_breaks == 0 and s.recompiles == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_default_fill_keeps_a_fading_guidance_on_every_family(family):
    """The default fill ("delta"), gamma = -1: one CFG step, then the conditional branch only, whose prediction
    gets the first step's guidance direction back, fading with t (cfg_loop's fill="delta")."""
    assert ditfx.AdaptiveGuidance().fill == "delta"
    model, kw = tiny_model(family, batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0))
    got = cfg_loop(fast, kw, family)
    expected = cfg_loop(model, kw, family, cfg_steps=1, fill="delta")
    assert (got - expected).abs().max() <= TOL
    s = ditfx.stats(fast)
    assert s.nfe == (2 * STEPS if family in NOT_REBATCHABLE else 2 * 1 + (STEPS - 1))
    assert s.graph_breaks == 0 and s.recompiles == 0


@pytest.mark.parametrize("uncond_first", [True, False])
@pytest.mark.parametrize("two_calls", [False, True])
def test_layouts(two_calls, uncond_first):
    """Batched and two-call CFG, either branch first: gamma = -1 gives one CFG step then conditional only."""
    model, kw = tiny_model("dit", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, uncond_first=uncond_first, fill="cond"))
    got = cfg_loop(fast, kw, "dit", two_calls=two_calls, uncond_first=uncond_first)
    expected = cfg_loop(model, kw, "dit", uncond_first=uncond_first, cfg_steps=1)
    assert (got - expected).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 1 + STEPS


@torch.no_grad()
def test_delta_fill_keeps_the_last_guidance_direction_fading_with_t():
    """fill="delta", gamma = -1: after the one CFG step (t0) the unconditional slot at t holds
    c_t - (c_t0 - u_t0) * t / t0, and the conditional half is still exact."""
    model, kw = tiny_model("dit", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, fill="delta"))
    x = torch.cat([kw["hidden_states"][:2]] * 2)  # batched CFG: the same latents in both halves
    labels = torch.tensor([10, 10, 3, 7])  # unconditional (null class) half first

    def both(t, x):
        args = dict(hidden_states=x, timestep=torch.full((4,), t), class_labels=labels, return_dict=False)
        return fast(**args)[0], model(**args)[0]

    got0, ref0 = both(1000.0, x)
    assert (got0 - ref0).abs().max() <= TOL
    guided = ref0[:2] + 3.0 * (ref0[2:] - ref0[:2])
    x1 = torch.cat([x[:2] - 0.1 * guided] * 2)
    got1, ref1 = both(400.0, x1)
    assert (got1[2:] - ref1[2:]).abs().max() <= TOL
    expected_uncond = ref1[2:] - (ref0[2:] - ref0[:2]) * 0.4
    assert (got1[:2] - expected_uncond).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 2 + 1


def pair_alone(kw: dict, i: int) -> dict:
    """The inputs of CFG pair ``i`` alone, from a batch of two pairs (unconditional rows first)."""
    return {k: (v[[i, 2 + i]] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 4 else v)
            for k, v in kw.items()}


def switch_steps(trace: list[list[float]], gamma: float) -> list[int]:
    """Per sample, the step after which its guidance ended (the first step whose cosine reaches gamma)."""
    return [next((k + 1 for k, row in enumerate(trace) if row[i] >= gamma), len(trace))
            for i in range(len(trace[0]))]


def test_nfe_counts_cfg_steps_and_per_sample_switching_equals_each_sample_alone():
    model, kw = tiny_model("reference", batch=4)  # two samples
    probe = optimized(model, ditfx.AdaptiveGuidance(gamma=1.0))
    cfg_loop(probe, kw, "reference")
    trace = ditfx.guidance_trace(probe)  # every step measured: the cosine curve of each sample
    torch._dynamo.reset()
    # a sample follows its CFG trajectory until it switches, so the trace predicts each switch; pick a gamma
    # at which the two samples switch at different steps
    values = sorted({v for row in trace for v in row if v == v})
    # midpoints between measured cosines: a gamma equal to one of them would tie, and the samples run alone (or
    # another CPU) round that cosine either side of it
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])]
    gamma = next(g for g in candidates if len(set(switch_steps(trace, g))) == 2 and max(switch_steps(trace, g)) < STEPS)
    expected_k = switch_steps(trace, gamma)

    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=gamma, fill="cond"))
    both = cfg_loop(fast, kw, "reference")
    s = ditfx.stats(fast)
    # per sample NFE = 2k + (T - k); the batch's nfe is their mean
    assert s.nfe == pytest.approx(sum(2 * k + STEPS - k for k in expected_k) / 2)
    for i in range(2):
        torch._dynamo.reset()
        alone_kw = pair_alone(kw, i)
        alone = optimized(model, ditfx.AdaptiveGuidance(gamma=gamma, fill="cond"))
        got = cfg_loop(alone, alone_kw, "reference")
        assert (got - both[i:i + 1]).abs().max() <= TOL
        assert cfg_loop(model, alone_kw, "reference", cfg_steps=expected_k[i]).sub(got).abs().max() <= TOL
    # fill="delta" keeps a per-sample guidance direction: still each sample as if alone
    torch._dynamo.reset()
    both = cfg_loop(optimized(model, ditfx.AdaptiveGuidance(gamma=gamma, fill="delta")), kw, "reference")
    for i in range(2):
        torch._dynamo.reset()
        alone_kw = pair_alone(kw, i)
        got = cfg_loop(optimized(model, ditfx.AdaptiveGuidance(gamma=gamma, fill="delta")), alone_kw, "reference")
        assert (got - both[i:i + 1]).abs().max() <= TOL


def test_per_batch_switches_when_every_sample_has_reached_gamma():
    model, kw = tiny_model("reference", batch=4)
    probe = optimized(model, ditfx.AdaptiveGuidance(gamma=1.0))
    cfg_loop(probe, kw, "reference")
    trace = ditfx.guidance_trace(probe)
    gamma = between((min(row) for row in trace), STEPS // 2 - 1)
    k = switch_steps([[min(row)] for row in trace], gamma)[0]
    torch._dynamo.reset()
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=gamma, per_sample=False, fill="cond"))
    got = cfg_loop(fast, kw, "reference")
    assert (got - cfg_loop(model, kw, "reference", cfg_steps=k)).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 2 * k + STEPS - k


def test_warmup_keeps_guidance_until_its_fraction_of_the_generation():
    """With warmup 0.5 no sample switches before progress 1/2 (step 4 of 8): gamma = -1 switches there."""
    model, kw = tiny_model("dit", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, warmup=0.5, fill="cond"))
    got = cfg_loop(fast, kw, "dit")
    assert (got - cfg_loop(model, kw, "dit", cfg_steps=STEPS // 2 + 1)).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 2 * (STEPS // 2 + 1) + STEPS // 2 - 1


def test_with_caching_at_its_exact_limit_equals_guidance_alone():
    model, kw = tiny_model("dit", batch=4)
    alone = cfg_loop(optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0)), kw, "dit")
    torch._dynamo.reset()
    for cache in (ditfx.DynamicCache(threshold=0.0), ditfx.DynamicCache(threshold=0.0, per_sample=False)):
        fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0), cache)
        assert (cfg_loop(fast, kw, "dit") - alone).abs().max() <= TOL
        assert ditfx.stats(fast).block_evals_skipped == 0
        torch._dynamo.reset()


def test_with_caching_skips_blocks_and_keeps_cond_rows_caches():
    """Skipping blocks and dropping the unconditional rows together: the conditional rows keep their cached
    residuals across the switch, nothing recompiles, and the result stays close to CFG-then-cond."""
    model, kw = tiny_model("reference", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0), ditfx.DynamicCache(threshold=1.3))
    got = cfg_loop(fast, kw, "reference")
    s = ditfx.stats(fast)
    assert s.block_evals_skipped > 0 and s.nfe == 1 + STEPS
    assert s.recompiles == 0 and s.graph_breaks == 0
    assert torch.isfinite(got).all()


def test_window_runs_guidance_inside_it_only():
    model, kw = tiny_model("dit", batch=4)
    fast = optimized(model, ditfx.GuidanceWindow(start=0.0, stop=0.5))
    got = cfg_loop(fast, kw, "dit")
    assert (got - cfg_loop(model, kw, "dit", cfg_steps=STEPS // 2)).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 2 * (STEPS // 2) + STEPS // 2


def test_linear_ag_fit_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    steps, true = 8, {}
    cond, uncond = [], []
    for _ in range(3):
        c = [torch.randn(4, 2, 3, 3, generator=g) for _ in range(steps)]
        u = [torch.randn(4, 2, 3, 3, generator=g)]
        for k in range(1, steps):
            cols = linear_ag.features(c, u, k)
            betas = true.setdefault(k, torch.randn(len(cols) + 1, generator=g).tolist())
            u.append(linear_ag.combine(betas, cols))
        cond.append(c)
        uncond.append(u)
    fitted = linear_ag.fit(cond, uncond, [1 - k / steps for k in range(steps)])
    for k in range(steps):
        if linear_ag.step_kind(k, steps) == "estimate":
            assert fitted.betas[k] == pytest.approx(true[k], abs=1e-6)
            assert fitted.fit_error[k] < 1e-6  # float32 trajectories
        else:
            assert fitted.betas[k] is None


def test_linear_ag_schedule_and_calibration(tmp_path):
    """Calibrate on the model, save and load the coefficients, run: NFE = exact (2) and estimated (1) steps
    alternating in the first half, conditional only in the second."""
    model, kw = tiny_model("dit", batch=4)
    coefficients = ditfx.calibrate_guidance(model, lambda m: cfg_loop(m, kw, "dit"), generations=2)
    path = coefficients.save(tmp_path / "linear_ag.json")
    torch._dynamo.reset()
    fast = optimized(model, ditfx.LinearAG(path))
    got = cfg_loop(fast, kw, "dit")
    kinds = [linear_ag.step_kind(k, STEPS) for k in range(STEPS)]
    assert ditfx.stats(fast).nfe == sum(2 if k == "exact" else 1 for k in kinds) == 10
    cfg = cfg_loop(model, kw, "dit")
    cond_only = cfg_loop(model, kw, "dit", cfg_steps=0)
    assert (got - cfg).abs().max() < (cond_only - cfg).abs().max()  # closer to CFG than dropping guidance
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="another step grid"):
        cfg_loop(optimized(model, ditfx.LinearAG(path)), kw, "dit", steps=12)


def test_no_cfg_found_warns_and_changes_nothing():
    model, kw = tiny_model("dit", batch=2)
    from conftest import run_loop

    expected = run_loop(model, kw, "dit")
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0))
    with pytest.warns(UserWarning, match="no classifier-free guidance"):
        got = run_loop(fast, kw, "dit")
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("bad, message", [
    (lambda: ditfx.AdaptiveGuidance(gamma=1.5), "cosine in"),
    (lambda: ditfx.AdaptiveGuidance(warmup=1.0), "warmup is a fraction"),
    (lambda: ditfx.AdaptiveGuidance(fill="zero"), "fill must be 'cond'"),
    (lambda: ditfx.GuidanceWindow(start=0.6, stop=0.2), "start <= stop"),
    (lambda: ditfx.LinearAG("/nonexistent/coefficients.json"), "not found"),
    (lambda: ditfx.Config(guidance="adaptive"), "Config.guidance must be"),
])
def test_bad_guidance_configs_raise_clear_errors(bad, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        bad()


def test_options_dict_builds_guidance():
    config = ditfx.Config.from_options({"guidance": {"kind": "adaptive", "gamma": 0.9}})
    assert config.guidance == ditfx.AdaptiveGuidance(gamma=0.9)
    assert math.isclose(config.guidance.gamma, 0.9)


def test_cosine_is_measured_by_the_compiled_epilogue():
    """Batched CFG: AG's cosine comes from the sums the compiled epilogue returns next to the prediction (one
    epilogue call per full step, no pass of the runtime over the outputs); it equals the runtime's measurement of
    the same model called as two calls per step."""
    from ditfx.api import _runtime

    model, kw = tiny_model("reference", batch=4)
    traces, measured_in_epilogue = [], []
    for two_calls in (False, True):
        torch._dynamo.reset()
        fast = optimized(model, ditfx.AdaptiveGuidance(gamma=1.0))
        cfg_loop(fast, kw, "reference", two_calls=two_calls)
        traces.append(torch.tensor(ditfx.guidance_trace(fast)))
        calls = _runtime(fast).compiler.calls
        measured_in_epilogue.append(sum(n for key, n in calls.items() if key.transforms == ("guidance.cosine",)))
    assert measured_in_epilogue == [STEPS, 0]
    assert traces[0].shape == (STEPS, 2)
    torch.testing.assert_close(traces[0], traces[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["reference", "dit"])
@pytest.mark.parametrize("two_calls", [False, True])
@pytest.mark.parametrize("uncond_first", [True, False])
def test_the_null_class_says_which_branch_is_unconditional(family, two_calls, uncond_first):
    """Class-conditional models, default config (uncond_first=None): either order, batched ([cond, null] as
    diffusers' DiTPipeline) or two calls, is found from the null class, and gamma = -1 drops the right branch."""
    model, kw = tiny_model(family, batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"))
    got = cfg_loop(fast, kw, family, two_calls=two_calls, uncond_first=uncond_first)
    expected = cfg_loop(model, kw, family, uncond_first=uncond_first, cfg_steps=1)
    assert (got - expected).abs().max() <= TOL
    assert ditfx.stats(fast).nfe == 1 + STEPS


@pytest.mark.parametrize("two_calls, uncond_first", [(False, True), (True, False)])
def test_without_names_or_a_null_class_the_default_is_diffusers_convention(two_calls, uncond_first):
    """A text-conditioned model (no null class) in a hand-written loop: batched calls put the unconditional half
    first, two-call steps call the conditional branch first, as every diffusers pipeline does."""
    model, kw = tiny_model("pixart", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"))
    got = cfg_loop(fast, kw, "pixart", two_calls=two_calls, uncond_first=uncond_first)
    expected = cfg_loop(model, kw, "pixart", uncond_first=uncond_first, cfg_steps=1)
    assert (got - expected).abs().max() <= TOL


def test_a_stated_order_the_null_class_contradicts_warns_and_follows_the_data():
    model, kw = tiny_model("reference", batch=4)
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond", uncond_first=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cfg_loop(fast, kw, "reference", uncond_first=False)
    assert any("following the data" in str(w.message) for w in caught)
    expected = cfg_loop(model, kw, "reference", uncond_first=False, cfg_steps=1)
    assert (got - expected).abs().max() <= TOL


def test_a_window_skips_the_unconditional_call_of_step_zero_when_the_pipeline_names_it():
    """Named two-call steps (cache_context): the layout is known at the first call, so a window that starts
    later drops step 0's unconditional call too."""
    model, kw = tiny_model("flux", batch=2)
    fast = optimized(model, ditfx.GuidanceWindow(start=0.5, stop=1.0))
    x = kw["hidden_states"]
    with torch.no_grad(), ditfx.generation(fast):
        for k in range(4):
            t = torch.full((2,), 1.0 - k / 4)
            with fast.cache_context("cond"):
                c = fast(**{**kw, "hidden_states": x, "timestep": t}, return_dict=False)[0]
            with fast.cache_context("uncond"):
                fast(**{**kw, "hidden_states": x, "timestep": t}, return_dict=False)
            x = x - c / 4
    s = ditfx.stats(fast)
    assert s.nfe_skipped == 2 and s.nfe == 4 + 2  # steps 0 and 1 are outside [0.5, 1): no unconditional call


def test_row_state_views_a_call_that_computes_no_rows():
    """A two-call step whose unconditional call computes none of its rows (every sample switched) views an empty
    set of rows; the state comes back whole afterwards (found tuning a tiny Flux pipeline with a cache and AG)."""
    from ditfx.runtime.rows import RowState

    full = {"cached": torch.arange(6.0).reshape(2, 3)}
    state = RowState(full, rows=2)
    assert state.view(torch.tensor([], dtype=torch.long))["cached"].shape == (0, 3)
    assert torch.equal(state.view(None)["cached"], full["cached"])


@pytest.mark.parametrize("batch,two_calls", [(8, False), (6, False), (10, True)])
def test_every_row_count_that_runs_is_a_bucket_a_package_ships(batch, two_calls):
    """One bucket rule for row subsets (runtime/rows.py): guidance's partial and conditional-only calls, and a
    per-sample cache's subsets inside them, run only on row counts the package of the same plan ships when its
    graphs take no dynamic batch (package/artifacts.needed_rows)."""
    from ditfx.package.artifacts import needed_rows

    model, kw = tiny_model("reference", batch=batch)
    probe = optimized(model, ditfx.AdaptiveGuidance(gamma=1.0))
    cfg_loop(probe, kw, "reference", two_calls=two_calls)
    values = [v for row in ditfx.guidance_trace(probe) for v in row]
    gamma = between(values, len(set(values)) // 2 - 1)  # about half the samples' steps switch: partial calls
    torch._dynamo.reset()
    fast = optimized(model, ditfx.AdaptiveGuidance(gamma=gamma), cache=ditfx.DynamicCache(threshold=0.3))
    cfg_loop(fast, kw, "reference", two_calls=two_calls)
    runtime = ditfx.api.runtime_of(fast)
    (executor,) = runtime.executors
    ran = {key.rows for key in runtime.compiler.calls}
    assert ditfx.stats(fast).nfe_skipped > 0 and len(ran) > 1  # it ran on fewer rows
    assert ran <= set(needed_rows(executor.plan))
