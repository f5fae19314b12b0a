"""Lowering of the block-cache bookkeeping to ``ditfx.cache_residual``: small graphs, then a model with guidance."""
import warnings

import pytest
import torch

import ditfx
from conftest import cfg_loop, function_graph, tiny_model
from ditfx.kernels.lowering.cache_bookkeeping import find_bookkeeping, fuse_bookkeeping
from ditfx.kernels.lowering.fusion import FusionReport

SHAPE = (2, 5, 8)


def functional(out, inp, ref):
    r = torch.sub(out, inp)
    num = torch.sum(torch.flatten(torch.abs(torch.sub(r, ref)), 1), 1, dtype=torch.float32)
    den = torch.sum(torch.flatten(torch.abs(ref), 1), 1, dtype=torch.float32)
    return r, num, den


def methods(out, inp, ref):
    r = out - inp
    return r, (r - ref).abs().flatten(1).sum(1, dtype=torch.float32), ref.abs().flatten(1).sum(1, dtype=torch.float32)


def cache_ops(gm) -> list[str]:
    return [n.target.name() for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "ditfx"]


@pytest.mark.parametrize("fn", [functional, methods])
def test_bookkeeping_becomes_one_op(fn):
    args = [torch.randn(SHAPE) for _ in range(3)]
    gm, inputs = function_graph(fn, *args)
    report = FusionReport()
    fused = fuse_bookkeeping(gm, report, "block.0/probe")
    assert cache_ops(fused) == ["ditfx::cache_residual"]
    # Only the op, its three parts and what feeds them remain: no sub, abs, flatten or sum.
    assert {n.op for n in fused.graph.nodes} == {"placeholder", "call_function", "output"}
    for got, expected in zip(fused(*inputs), fn(*args), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (site,) = report.sites["block.0/probe"]
    assert site.pattern == "cache_bookkeeping" and site.kernel == "cache_residual"
    assert "cache_residual" in report.sources and not report.not_lowered


def test_residual_keeps_its_other_uses():
    def fn(out, inp, ref):
        r, num, den = functional(out, inp, ref)
        return r * 2, num / den

    args = [torch.randn(SHAPE) for _ in range(3)]
    gm, inputs = function_graph(fn, *args)
    fused = fuse_bookkeeping(gm, FusionReport(), "g")
    assert cache_ops(fused) == ["ditfx::cache_residual"]
    for got, expected in zip(fused(*inputs), fn(*args), strict=True):
        torch.testing.assert_close(got, expected)


def test_what_is_left_alone():
    # Output mode caches the block output: no residual sub, so nothing to match.
    def output_mode(out, ref):
        return out, torch.sum(torch.flatten(torch.abs(out - ref), 1), 1, dtype=torch.float32)

    gm, _ = function_graph(output_mode, torch.randn(SHAPE), torch.randn(SHAPE))
    assert find_bookkeeping(gm.graph) == [] and fuse_bookkeeping(gm, FusionReport(), "g") is gm

    # A reference of another dtype: the op reads one dtype, so the match is reported, not lowered.
    args = [torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE, dtype=torch.float64)]
    gm, _ = function_graph(functional, *args)
    report = FusionReport()
    fused = fuse_bookkeeping(gm, report, "g")
    assert cache_ops(fused) == [] and not report.sites
    (why,) = report.not_lowered["g"]
    assert "share a dtype" in why


def test_guidance_rebatches_the_lowered_probe():
    """gamma = -1 with caching at its exact limit: the probe variant, with its cache_residual call, is re-batched
    to the conditional rows after the first step, and the result is plain CFG for one step then cond only."""
    model, kw = tiny_model("reference", batch=4)
    expected = cfg_loop(model, kw, "reference", cfg_steps=1)
    config = ditfx.Config(guidance=ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"),
                          cache=ditfx.DynamicCache(threshold=0.0), kernels=True, compiler="aot_eager")
    fast = ditfx.optimize(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused re-batched variant would warn and fall back
        got = cfg_loop(fast, kw, "reference")
    assert (got - expected).abs().max().item() <= 1e-5
    torch._dynamo.reset()
