"""End to end on tiny diffusers pipelines (tests/pipelines.py): each calls its transformer as LAYOUTS records, and
``ditfx.optimize(pipe)`` without approximation generates what the pipeline generates, generation after generation.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from pipelines import LAYOUTS, NAMES, build, observe, run

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


def _cfg_on_first_step_only(pipe):
    """The un-optimized pipeline, with each batched call's unconditional half replaced by its conditional half
    after the first step: what guidance skipping with gamma = -1 and fill="cond" generates."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(None)
        if len(calls) == 1:
            return output
        sample = output[0]
        half = sample.shape[0] // 2
        return (torch.cat([sample[half:], sample[half:]]), *output[1:])

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["pixart_alpha", "pixart_sigma", "sana"])
def test_guidance_skipping_runs_the_conditional_rows_alone(name):
    """gamma = -1: after the first step the batched call runs on its conditional rows only, on re-batched region
    graphs; their attention mask is repeated per head with ``output_size=rows * heads`` (passes/rebatch.py)."""
    assert LAYOUTS[name].batched and LAYOUTS[name].uncond_first
    pipe, kw = build(name)
    handle = _cfg_on_first_step_only(pipe)
    expected = run(pipe, kw, 0)
    handle.remove()
    config = ditfx.Config(compiler="eager", guidance=ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"))
    (got,), warned = _optimize(pipe, config, kw, (0,))
    assert not [w for w in warned if "cannot run this graph" in w], warned  # no fall-back to every row
    assert (got - expected).abs().max().item() <= TOL
    assert ditfx.stats(pipe).nfe_skipped > 0
