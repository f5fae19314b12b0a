"""The generation lifecycle and the runtime's resources: every way a user drives a model gives the right result,
or a warning that says what was turned off."""
import copy
import gc
import threading
import warnings
import weakref

import pytest
import torch

import ditfx
from conftest import run_loop, tiny_model
from ditfx.models import build_dit

SKIPPY = 1.3  # a threshold at which the tiny reference DiT skips most middle blocks
CACHE = ditfx.Config(cache=ditfx.DynamicCache(threshold=SKIPPY), compiler="eager")
EXACT = ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0), compiler="eager")
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class FloatTimestep(torch.nn.Module):
    """A denoiser that takes its noise level as a Python number (Dynamo bakes it into the graph)."""

    def __init__(self):
        super().__init__()
        self.dit = tiny_model("reference")[0]  # random weights: a fresh DiT's output layer is zero

    def forward(self, x, noise_level, y):
        return self.dit(x, torch.full((x.shape[0],), noise_level), y)


class NoiseLevel(torch.nn.Module):
    """A denoiser whose timestep argument is not named like a timestep."""

    def __init__(self):
        super().__init__()
        self.dit = tiny_model("reference")[0]

    def forward(self, x, noise_level, y):
        return self.dit(x, noise_level, y)


def euler(model, x, y, steps=6, tensor_t=True, start=1000.0):
    for k in range(steps):
        t = start * (1 - k / steps)
        x = x - model(x, torch.full((x.shape[0],), t) if tensor_t else t, y)[:, :4] / steps
    return x


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.arange(batch) % 10


def test_python_float_timestep_warns_and_never_reuses_another_generations_state():
    model = FloatTimestep()
    fast = ditfx.optimize(model, CACHE)
    x, y = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = euler(fast, x, y, tensor_t=False)
        second = euler(fast, inputs(1)[0], y, tensor_t=False)
    assert any("no timestep that ditfx can read" in str(w.message) for w in caught)
    with torch.no_grad():
        assert (first - euler(model, x, y, tensor_t=False)).abs().max() <= TOL
        assert (second - euler(model, inputs(1)[0], y, tensor_t=False)).abs().max() <= TOL


def test_a_timestep_named_otherwise_is_found_by_data_flow():
    model = NoiseLevel()
    fast = ditfx.optimize(model, CACHE)
    x, y = inputs()
    a = euler(fast, x, y)
    b = euler(fast, inputs(1)[0], y)
    s = ditfx.stats(fast)
    assert s.generations == 2 and s.block_evals_skipped > 0
    fresh = euler(ditfx.optimize(model, CACHE), inputs(1)[0], y)
    assert torch.equal(b, fresh) and not torch.equal(a, b)


def test_back_to_back_one_step_generations_are_each_exact():
    model = NoiseLevel()
    fast = ditfx.optimize(model, CACHE)
    for seed in range(3):
        x, y = inputs(seed)
        with torch.no_grad():
            assert (euler(fast, x, y, steps=1) - euler(model, x, y, steps=1)).abs().max() <= TOL


def test_an_interrupted_generation_leaves_nothing_behind():
    model = NoiseLevel()
    fast = ditfx.optimize(model, CACHE)
    x, y = inputs()
    euler(fast, inputs(3)[0], y, steps=6)  # a full generation, then one interrupted after its first step
    x1 = inputs(4)[0]
    fast(x1, torch.full((2,), 1000.0), y)
    got = euler(fast, x, y)
    assert torch.equal(got, euler(ditfx.optimize(model, CACHE), x, y))


def heun(model, x, y, steps=6):
    """Heun's method (k-diffusion's sample_heun): each step's correction evaluates at the next timestep, where the
    next step evaluates again: two calls at every timestep after the first, on different latents."""
    ts = [1000.0 * (1 - k / steps) for k in range(steps + 1)]
    for k in range(steps):
        t, t_next = torch.full((x.shape[0],), ts[k]), torch.full((x.shape[0],), ts[k + 1])
        d = model(x, t, y)[:, :4]
        x_euler = x + (ts[k + 1] - ts[k]) / 1000 * d
        if ts[k + 1] == 0:
            x = x_euler
        else:
            x = x + (ts[k + 1] - ts[k]) / 1000 * (d + model(x_euler, t_next, y)[:, :4]) / 2
    return x


def test_second_order_sampler_keeps_its_state_inside_a_generation():
    model = NoiseLevel()
    x, y = inputs()
    exact = ditfx.optimize(model, EXACT)
    with ditfx.generation(exact):
        got = heun(exact, x, y)
    with torch.no_grad():
        assert (got - heun(model, x, y)).abs().max() <= TOL
    fast = ditfx.optimize(model, CACHE)
    with ditfx.generation(fast):
        stated = heun(fast, x, y)
    s = ditfx.stats(fast)
    assert (s.generations, s.calls, s.steps) == (1, 11, 11) and s.block_evals_skipped > 0
    # without ditfx.generation(): the repeats past the first timestep are placed the same way, with a warning
    torch._dynamo.reset()
    fast = ditfx.optimize(model, CACHE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guessed = heun(fast, x, y)
        heun(fast, inputs(1)[0], y)  # the next generation starts back at the first timestep
    assert any("second-order sampler" in str(w.message) for w in caught)
    assert torch.equal(guessed, stated) and ditfx.stats(fast).generations == 2


def test_two_threads_keep_their_own_state():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, CACHE)
    other = {**kw, "x": torch.randn_like(kw["x"])}
    expected = {name: run_loop(ditfx.optimize(model, CACHE), k, "reference", steps=8)
                for name, k in (("a", kw), ("b", other))}
    got, errors = {}, []

    def work(name, k):
        try:
            for _ in range(3):
                got[name] = run_loop(fast, k, "reference", steps=8)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=("a", kw)), threading.Thread(target=work, args=("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(got["a"], expected["a"]) and torch.equal(got["b"], expected["b"])
    assert ditfx.stats(fast).block_evals_skipped > 0


def test_a_deleted_model_is_freed():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(0.1), compiler="aot_eager"))
    run_loop(fast, kw, "reference", steps=2)
    weight = weakref.ref(next(model.parameters()))
    del model, fast
    gc.collect()
    assert weight() is None


def test_deepcopy_after_the_first_call():
    model, kw = tiny_model("reference")
    fast = ditfx.optimize(model, CACHE)
    first = run_loop(fast, kw, "reference", steps=4)
    twin = copy.deepcopy(fast)
    assert torch.equal(run_loop(twin, kw, "reference", steps=4), first)
    assert ditfx.stats(twin).calls == 4 and ditfx.stats(fast).calls == 4


def test_many_models_and_batch_sizes_stay_compiled():
    """Past Dynamo's recompile limit (8 per code object) ditfx keeps compiling: every call runs through it."""
    models = []
    for seed in range(10):
        torch.manual_seed(seed)
        m = build_dit("DiT-T/2").eval()
        fast = ditfx.optimize(m, ditfx.Config(compiler="eager"))
        fast(*inputs(seed)[:1], torch.full((2,), 500.0), torch.tensor([1, 2]))
        models.append(fast)
    assert [ditfx.stats(f).calls for f in models] == [1] * 10
    fast = models[0]
    for batch in range(1, 11):
        x, y = inputs(batch, batch)
        fast(x, torch.full((batch,), 500.0), y)
    assert ditfx.stats(fast).calls == 11


def test_nan_in_one_sample_never_makes_the_batch_skip():
    model, kw = tiny_model("reference", batch=2)
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=1e9, per_sample=False, warmup=0), compiler="eager")
    fast = ditfx.optimize(model, config)
    x = kw["x"].clone()
    x[0] = float("nan")
    run_loop(fast, {**kw, "x": x}, "reference", steps=4)
    assert ditfx.stats(fast).block_evals_skipped == 0


def test_identical_halves_without_guidance_are_not_taken_for_guidance():
    """One noise for two classes, no guidance: the halves share latents but neither is the null class."""
    shared_noise_without_guidance("reference", "x", {"y": torch.tensor([3, 5])},
                                  "neither half holds only the null class")


def test_identical_halves_of_a_text_model_stop_being_guidance_when_they_part():
    """No null class to ask: one noise for two prompts looks like batched guidance at the first step (which
    always computes every row), and the halves part at the next one: guidance skipping stops, nothing is
    overwritten."""
    shared_noise_without_guidance("pixart", "hidden_states", {}, "stopped sharing latents")


def shared_noise_without_guidance(family: str, latents: str, overrides: dict, warning: str):
    """Two samples from one noise, no guidance, under AdaptiveGuidance: the pipeline's output, and ``warning``."""
    model, kw = tiny_model(family, batch=2)
    kw = {**kw, latents: kw[latents][:1].expand(2, -1, -1, -1).clone(), **overrides}
    fast = ditfx.optimize(model, ditfx.Config(guidance=ditfx.AdaptiveGuidance(gamma=-1.0), compiler="eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_loop(fast, kw, family)
    assert any(warning in str(w.message) for w in caught)
    with torch.no_grad():
        assert (got - run_loop(model, kw, family)).abs().max() <= TOL
