"""Where a generation starts when a pipeline's call ends badly or a model is shared: every pipeline call is a
generation of its own, however the previous one ended and whichever pipeline makes it."""
import copy
import inspect
import warnings

import pytest
import torch
from pipelines import build, run

import ditfx
from ditfx.models import zoo

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SKIP_ALL = ditfx.Config(cache=ditfx.DynamicCache(threshold=1e9), compiler="eager")  # reuse whenever it can
TOL = 1e-5


class Abort(Exception):
    pass


def abort_at(step: int):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Abort()
        return kwargs
    return callback


def fresh(name: str, config=SKIP_ALL):
    pipe, kw = build(name)
    return ditfx.optimize(pipe, config), kw


def run_aborted(pipe, kw, step: int) -> None:
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        callback = {"callback_on_step_end": abort_at(step)}
    else:  # PixArt's older callback(step, timestep, latents)
        callback = {"callback": lambda i, t, latents: abort_at(step)(pipe, i, t, {}), "callback_steps": 1}
    with pytest.raises(Abort):
        run(pipe, {**kw, **callback}, seed=5)


@pytest.mark.parametrize("name, step", [(name, 0) for name in ("flux", "qwenimage", "wan", "sd3", "pixart_sigma")]
                         + [("flux", 1)])
def test_a_call_after_an_aborted_one_is_a_generation_of_its_own(name, step):
    pipe, kw = fresh(name)
    run_aborted(pipe, kw, step)
    got = run(pipe, kw, seed=1)
    other, _ = fresh(name)
    want = run(other, kw, seed=1)
    s = ditfx.stats(pipe)
    assert (got - want).abs().max() <= TOL
    assert s.generations == 2 and ditfx.stats(other).block_evals_skipped > 0


def test_a_call_after_its_scheduler_was_replaced_is_a_generation_of_its_own():
    pipe, kw = fresh("pixart_sigma")
    run_aborted(pipe, kw, 0)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    got = run(pipe, kw, seed=1)
    other, _ = fresh("pixart_sigma")
    assert (got - run(other, kw, seed=1)).abs().max() <= TOL and ditfx.stats(pipe).generations == 2


def test_the_digits_pipeline_after_an_aborted_call():
    from ditfx.models import digits

    def make():
        pipe = ditfx.optimize(digits.pipeline(), ditfx.Config(cache=ditfx.DynamicCache(threshold=1e9),
                                                              compiler="eager"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe, seed, **kw):
        return pipe([1, 7], num_inference_steps=6, guidance_scale=1.5, output_type="pt",
                    generator=torch.Generator().manual_seed(seed), **kw).images

    pipe = make()
    with pytest.raises(Abort):
        sample(pipe, 5, callback_on_step_end=abort_at(0))
    got = sample(pipe, 1)
    assert (got - sample(make(), 1)).abs().max() <= TOL and ditfx.stats(pipe).generations == 2


@pytest.mark.parametrize("name", ["pixart_sigma", "sd3"])
def test_a_second_pipeline_around_the_optimized_transformer_starts_its_own_generations(name):
    """``type(pipe)(**{**pipe.components, "scheduler": new})``: the first pipeline's scheduler, finished, drives
    none of the second pipeline's calls."""
    pipe, kw = fresh(name)
    second = type(pipe)(**{**pipe.components, "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)})
    second.set_progress_bar_config(disable=True)
    calls = [(pipe, 3), (second, 5), (second, 2), (pipe, 4), (second, 5)]
    for k, (p, steps) in enumerate(calls):
        got = run(p, {**kw, "num_inference_steps": steps}, seed=k)
        alone, _ = fresh(name)
        want = run(alone, {**kw, "num_inference_steps": steps}, seed=k)
        assert (got - want).abs().max() <= TOL, (k, steps)
        assert ditfx.stats(pipe).generations == k + 1
    assert ditfx.stats(pipe).block_evals_skipped > 0


def test_flux_with_several_images_per_prompt_caches_exactly_at_the_limit():
    """Flux given ``prompt_embeds`` for one image and ``num_images_per_prompt=2``: the text stream enters the blocks
    with one row and leaves with two (a broadcast residual), and is still a residual stream."""
    pipe, kw = build("flux")
    kw = {**kw, "num_images_per_prompt": 2}
    expected = run(pipe, kw)
    for threshold in (0.0, 1e9):
        fast, _ = fresh("flux", ditfx.Config(cache=ditfx.DynamicCache(threshold=threshold), compiler="eager"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run(fast, kw)
        s = ditfx.stats(fast)
        assert not [w for w in caught if str(w.message).startswith("ditfx")], [str(w.message) for w in caught]
        assert s.graphs_without_ditfx == 0 and got.shape[0] == 2
        if threshold == 0.0:
            assert (got - expected).abs().max() <= TOL and s.block_evals_skipped == 0
        else:
            assert s.block_evals_skipped > 0


def test_lumina2_in_a_hand_written_loop_knows_its_steps_through_the_graph_break():
    """Lumina2's blocks graph (after diffusers' graph break) takes the time embedding, not the timestep: the piece
    before it notes the call's timestep, so a plain loop caches as every other family does."""
    named = zoo.load("tiny:lumina2")
    expected = [zoo.run_loop(named, steps=4) for _ in range(2)]
    for threshold in (0.0, 1e9):
        torch._dynamo.reset()
        fast = ditfx.optimize(named.model, ditfx.Config(cache=ditfx.DynamicCache(threshold), compiler="eager"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = [zoo.run_loop(named, fast, steps=4) for _ in range(2)]
        s = ditfx.stats(fast)
        assert s.generations == 2
        if threshold == 0.0:
            assert all((a - b).abs().max() <= TOL for a, b in zip(got, expected))
        else:
            assert s.block_evals_skipped > 0


def test_history_attention_needs_stated_generations():
    """A hand-written loop without ``ditfx.generation()`` cannot tell an img2img-like generation (starting below the
    previous one's last timestep) from the next step: history attention, which would read the previous
    generation's keys, refuses; with the generations marked, the second equals a fresh model's."""
    named = zoo.load("DiT-T/2", batch=2)
    config = ditfx.Config(compiler="eager", history=ditfx.HistoryAttention(2, steps=4))
    fast = ditfx.optimize(copy.deepcopy(named.model), config)
    x, y = named.inputs["x"], named.inputs["y"]
    with torch.no_grad(), pytest.raises(RuntimeError, match="ditfx.generation"):
        fast(x, torch.full((2,), 900.0), y)

    def loop(model, times):
        with ditfx.generation(model), torch.no_grad():
            return [model(x, torch.full((2,), t), y) for t in times]

    loop(fast, [999.0, 600.0])
    second = loop(fast, [400.0, 100.0])  # starts below the first one's last timestep
    alone = loop(ditfx.optimize(copy.deepcopy(named.model), config), [400.0, 100.0])
    assert all((a - b).abs().max() <= TOL for a, b in zip(second, alone))
