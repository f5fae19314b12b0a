"""End to end on tiny diffusers pipelines (tests/pipelines.py): each calls its transformer as LAYOUTS records, and
``ditfx.optimize(pipe)`` without approximation generates what the pipeline generates, generation after generation.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from pipelines import LAYOUTS, NAMES, STEPS, build, observe, run

import ditfx

TOL = 1e-5

# Graphs ditfx does not turn into a plan (it warns "ditfx: ..." and compiles them as they are).
FALLS_BACK = {
    "lumina2": "Lumina2's forward breaks the graph at attention_mask.sum(dim=1).tolist() (diffusers "
               "transformer_lumina2.py:273): Dynamo hands ditfx 4 graphs per call; the time/caption "
               "embedding, the mask sum and the RoPE/patchify graphs have no repeated blocks and fall back",
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", NAMES)
def test_layout_is_as_recorded(name):
    pipe, kw = build(name)
    assert observe(pipe, kw) == LAYOUTS[name]


def _optimize(pipe, config: ditfx.Config, kw: dict, seeds) -> tuple[list[torch.Tensor], list[str]]:
    """Generations of ``pipe`` optimized with ``config``, and the ditfx warnings they gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ditfx.optimize(pipe, config) is pipe
        outs = [run(pipe, kw, seed) for seed in seeds]
    return outs, [str(w.message) for w in caught if str(w.message).startswith("ditfx")]


@pytest.mark.parametrize("name", NAMES)
def test_eager_optimize_generates_what_the_pipeline_generates(name):
    """No approximation: two generations (seeds 0 and 1) equal the un-optimized pipeline's within 1e-5, and
    every graph Dynamo hands ditfx becomes a ditfx plan (no "ditfx: ..." fall-back warning)."""
    pipe, kw = build(name)
    expected = [run(pipe, kw, seed) for seed in (0, 1)]
    assert not torch.equal(*expected)  # the second generation is a different one
    got, fallbacks = _optimize(pipe, ditfx.Config(compiler="eager"), kw, (0, 1))
    for seed, (g, e) in enumerate(zip(got, expected)):
        err = (g - e).abs().max().item()
        assert err <= TOL, f"{name} generation {seed}: max abs error {err}"
    assert ditfx.stats(pipe).graphs >= 1  # Dynamo handed the transformer's graph(s) to ditfx
    if name not in FALLS_BACK:
        assert not fallbacks, fallbacks


@pytest.mark.parametrize("name", sorted(FALLS_BACK))
@pytest.mark.xfail(strict=True, reason="; ".join(f"{k}: {v}" for k, v in FALLS_BACK.items()))
def test_every_graph_becomes_a_ditfx_plan(name):
    pipe, kw = build(name)
    _, fallbacks = _optimize(pipe, ditfx.Config(compiler="eager"), kw, (0,))
    assert not fallbacks, fallbacks


def _cfg_on_first_step_only(pipe, layout):
    """The un-optimized pipeline, whose unconditional predictions are replaced by the conditional ones after the
    first step (as LAYOUTS says where they are): what guidance skipping with gamma = -1 and fill="cond" generates.
    Two calls with the unconditional call first cannot be replaced this way (its prediction comes first)."""
    assert layout.batched or not layout.uncond_first
    calls = []

    def replace(sample: torch.Tensor) -> torch.Tensor:
        calls.append(sample)
        if layout.batched:
            if len(calls) == 1:
                return sample
            half = sample.shape[0] // 2
            cond = sample[half:] if layout.uncond_first else sample[:half]
            return torch.cat([cond, cond])
        # two calls, the conditional one first: from the second step, the unconditional call returns the
        # conditional prediction of its step
        return calls[-2] if len(calls) > 2 and len(calls) % 2 == 0 else sample

    def hook(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return type(output)(sample=replace(output.sample))  # DiTPipeline reads .sample

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", NAMES)
def test_guidance_skipping_after_the_first_step(name):
    """AdaptiveGuidance(gamma=-1): one step with guidance, then the conditional branch only, the layout found by
    ditfx (no uncond_first given). Batched calls run their conditional rows alone on re-batched region graphs
    (PixArt's and Sana's attention mask is repeated per head with ``output_size=rows * heads``, which
    passes/rebatch.py rewrites); two-call steps skip the unconditional call."""
    pipe, kw = build(name)
    handle = _cfg_on_first_step_only(pipe, LAYOUTS[name])
    expected = run(pipe, kw, 0)
    handle.remove()
    config = ditfx.Config(compiler="eager", guidance=ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"))
    (got,), warned = _optimize(pipe, config, kw, (0,))
    assert not [w for w in warned if "cannot run this graph" in w], warned  # no fall-back to every row
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err}"
    assert ditfx.stats(pipe).nfe_skipped == STEPS - 1  # one sample: the unconditional branch of steps 2..T


@pytest.mark.parametrize("name", NAMES)
def test_cache_and_guidance_at_their_exact_limits_generate_what_the_pipeline_generates(name):
    """The default techniques together at their exact limits (threshold 0, gamma 1) on every pipeline: two
    generations equal the pipeline's; every generation is found (the pipeline states where one ends, or its
    scheduler counts the steps)."""
    pipe, kw = build(name)
    expected = [run(pipe, kw, seed) for seed in (0, 1)]
    config = ditfx.Config(compiler="eager", cache=ditfx.DynamicCache(threshold=0.0),
                          guidance=ditfx.AdaptiveGuidance(gamma=1.0))
    got, warned = _optimize(pipe, config, kw, (0, 1))
    for seed, (g, e) in enumerate(zip(got, expected)):
        err = (g - e).abs().max().item()
        assert err <= TOL, f"{name} generation {seed}: max abs error {err}"
    s = ditfx.stats(pipe)
    assert s.block_evals_skipped == 0 and s.nfe_skipped == 0
    if name not in FALLS_BACK:
        assert not warned, warned
        assert s.generations == 2


@pytest.mark.parametrize("name", [n for n in NAMES if LAYOUTS[n].resets_hooks])
def test_a_pipeline_that_resets_its_hooks_frees_ditfx_state_when_it_returns(name):
    pipe, kw = build(name)
    ditfx.optimize(pipe, ditfx.Config(compiler="eager", cache=ditfx.DynamicCache(threshold=0.1)))
    run(pipe, kw, 0)
    assert ditfx.stats(pipe).calls > 0
    assert not ditfx.api._runtime(pipe).store()._values  # freed by the pipeline's own reset, not the next call
