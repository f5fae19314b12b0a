"""The kernel fusion pass: sites lowered per model, exactness on the CPU path, pattern variants."""
import pytest
import torch
import torch.nn.functional as F

import ditfx
from conftest import call, cfg_loop, function_graph, run_loop, tiny_model
from ditfx.backend import DitfxBackend
from ditfx.kernels.lowering.fusion import FusionReport, fuse_graph
from ditfx.kernels.testing import assert_close

TOL = 1e-5

# (adaln_modulate, gated_residual, generated) sites per model, from the architectures:
# - a DiT block (reference, diffusers DiT, PixArt) has two adaLN-Zero sub-layers: each is one
#   LayerNorm + modulate and one gated residual -> 2 + 2 per block, 4 blocks;
# - an SD3 joint block does that for the image and the context stream (4 + 4), except the last
#   (context_pre_only): image 2 + 2, context only its AdaLayerNormContinuous (1 adaLN);
# - Flux: 2 double-stream blocks like SD3's (4 + 4), 3 single-stream blocks with one adaLN and one
#   gated residual each;
# - every epilogue's final layer is LayerNorm(x) * (1 + scale) + shift with the "1 + scale" hoisted
#   to the prologue (it depends only on the conditioning), so the epilogue reads LayerNorm(x) * a + b:
#   not the fixed kernel's formula, one generated layer-norm kernel.
EXPECTED_SITES = {
    "reference": (8, 8, 1),
    "dit": (8, 8, 1),
    "pixart": (8, 8, 1),
    "sd3": (12 + 3, 12 + 2, 1),
    "flux": (8 + 3, 8 + 3, 1),
}


def fusion_report(backend: DitfxBackend) -> FusionReport:
    (executor,) = backend.runtime.executors
    (report,) = [r for r in executor.plan.reports if isinstance(r, FusionReport)]
    return report


def ditfx_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target.name() for n in gm.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "ditfx"]


@pytest.mark.parametrize("family", list(EXPECTED_SITES))
def test_lowers_the_expected_sites_and_matches_eager(family):
    from torch._dynamo.utils import counters

    counters.clear()
    model, kw = tiny_model(family)
    with torch.no_grad():
        expected = call(model, kw, family)
        backend = DitfxBackend(ditfx.Config(kernels=True, compiler="aot_eager", compile_regions="all"))
        got = call(torch.compile(model, backend=backend, dynamic=False), kw, family)
    assert (got - expected).abs().max().item() <= TOL
    assert sum(counters["graph_break"].values()) == 0 and backend.runtime.stats.graphs == 1

    report = fusion_report(backend)
    counts = report.kernel_counts()
    generated = sum(n for k, n in counts.items() if k.startswith("layer_norm_elementwise_"))
    assert (counts.get("adaln_modulate", 0), counts.get("gated_residual", 0), generated) == (
        EXPECTED_SITES[family]), report.summary()
    assert report.total == sum(EXPECTED_SITES[family]) and not report.not_lowered
    # The regions the executor runs call the ops, and blocks rewritten alike still share one artifact.
    plan = backend.runtime.executors[0].plan
    assert sum(len(ditfx_ops(rm.gm)) for rm in plan.regions) == report.total
    blocks = [rm for rm in plan.regions if rm.region.kind == "block"]
    assert len({rm.signature for rm in blocks}) < len(blocks)
    torch._dynamo.reset()


def test_dynamic_cache_with_kernels_is_exact():
    """threshold 0 never reuses: the cache variants, built from the fused regions, reproduce eager."""
    model, kw = tiny_model("reference")
    expected = run_loop(model, kw, "reference", steps=4)
    config = ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0), kernels=True, compiler="aot_eager")
    backend = DitfxBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    got = run_loop(fast, kw, "reference", steps=4)
    assert (got - expected).abs().max().item() <= TOL
    plan = backend.runtime.executors[0].plan
    variants = {key: gm for key, gm in plan.built().items() if key.transforms}
    assert {key.transforms for key in variants} == {("cache.residual",), ("cache.probe",)}
    for gm in variants.values():
        assert ditfx_ops(gm).count("ditfx::gated_residual") == 2
    # The probe's bookkeeping (residual, change sums) is one cache_residual call; nothing else has it.
    ops = {key.transforms: ditfx_ops(gm).count("ditfx::cache_residual") for key, gm in variants.items()}
    assert ops == {("cache.probe",): 1, ("cache.residual",): 0}
    assert [s.kernel for s in fusion_report(backend).sites["block.0/probe"]] == ["cache_residual"]
    assert backend.runtime.stats.block_evals_skipped == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("per_sample", [True, False])
def test_dynamic_cache_decides_alike_with_kernels(per_sample):
    """With skipping on, the lowered bookkeeping gives the same changes, so the same blocks are skipped."""
    model, kw = tiny_model("reference", batch=2)
    results = []
    for kernels in (False, True):
        cache = ditfx.DynamicCache(threshold=1.0, per_sample=per_sample)  # skips some steps, not all
        fast = ditfx.optimize(model, ditfx.Config(cache=cache, kernels=kernels, compiler="aot_eager"))
        out = run_loop(fast, kw, "reference", steps=8)
        results.append((out, ditfx.stats(fast).block_evals_skipped))
        torch._dynamo.reset()
    (plain, skipped), (fused, skipped_fused) = results
    assert skipped > 0 and skipped_fused == skipped
    assert (plain - fused).abs().max().item() <= TOL


def test_guidance_rebatches_the_fused_regions():
    """gamma = -1 runs the conditional rows only after the first step, on re-batched copies of the fused
    regions: the ditfx ops carry no batch size, so re-batching accepts them and the result is exact."""
    import warnings

    model, kw = tiny_model("reference", batch=4)
    expected = cfg_loop(model, kw, "reference", cfg_steps=1)
    config = ditfx.Config(guidance=ditfx.AdaptiveGuidance(gamma=-1.0, fill="cond"), kernels=True,
                          compiler="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused re-batched variant would warn and fall back
        got = cfg_loop(ditfx.optimize(model, config), kw, "reference")
    assert (got - expected).abs().max().item() <= TOL
    torch._dynamo.reset()


def test_config_kernels_is_validated():
    with pytest.raises(ValueError, match="kernels"):
        ditfx.Config(kernels="yes")
    assert ditfx.Config.from_options({"kernels": True}).kernels is True


# ------------------------------------------------------------------ pattern variants on small graphs

B, T, D = 2, 5, 8


def fuse(fn, *args) -> tuple[list[str], FusionReport]:
    """The ditfx ops of ``fn``'s fused graph; the fused graph must compute ``fn``.

    Checked against ``fn`` in float64 within the output dtype's tolerance (16-bit eager rounds
    every intermediate, the kernels round once, so eager itself is not the oracle there).
    """
    report = FusionReport()
    gm, inputs = function_graph(fn, *args)
    fused = fuse_graph(gm, report)
    out = fused(*inputs)[0]
    assert out.dtype == fn(*args).dtype
    tolerance_of = torch.float32 if out.dtype == torch.float64 else out.dtype
    assert_close(out, fn(*(a.double() for a in args)), tolerance_of)
    return ditfx_ops(fused), report


def randn(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


def test_dit_modulate_is_the_fixed_kernel():
    def block(x, shift, scale):
        return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    ops, report = fuse(block, randn(B, T, D), randn(B, D), randn(B, D))
    assert ops == ["ditfx::adaln_modulate"]
    (site,) = report.sites["graph"]
    assert site.expression == "m1 + x*(m0 + 1)" and len(site.source_hash) == 20


def test_variants_get_generated_kernels():
    def scale_shift(x, a, b):  # the "1 +" computed elsewhere
        return F.layer_norm(x, (D,), eps=1e-5) * a + b

    def per_token_gate(x, gate, y):
        return x + gate * y

    ops, report = fuse(scale_shift, randn(B, T, D), randn(B, 1, D), randn(B, 1, D))
    assert ops == ["ditfx::fused_elementwise"]
    (kernel,) = report.sources
    assert kernel.startswith("layer_norm_elementwise_") and "tl.rsqrt" in report.sources[kernel]

    ops, report = fuse(per_token_gate, randn(B, T, D), randn(B, T, 1), randn(B, T, D))
    assert ops == ["ditfx::fused_elementwise"] and next(iter(report.sources)).startswith("elementwise_")


def test_per_token_modulation_and_gate_use_the_fixed_kernels():
    # (B, T, D) modulations (a timestep per token) are in both fixed kernels' contracts.
    def block(x, shift, scale, gate, w):
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift
        return x + gate * (h @ w)

    ops, _ = fuse(block, *(randn(B, T, D) for _ in range(4)), randn(D, D))
    assert sorted(ops) == ["ditfx::adaln_modulate", "ditfx::gated_residual"]


def test_normalised_and_raw_input_are_two_operands():
    def pre_norm_skip(x, scale):
        return F.layer_norm(x, (D,), eps=1e-6) * scale + x

    ops, report = fuse(pre_norm_skip, randn(B, T, D), randn(B, 1, D))
    assert ops == ["ditfx::fused_elementwise"]
    assert report.sites["graph"][0].expression in ("m0*x + y0", "x*m0 + y0", "y0 + m0*x")


def test_kernel_names_follow_expression_and_dtypes():
    def scale_shift(x, a, b):
        return F.layer_norm(x, (D,), eps=1e-5) * a + b

    names = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        _, report = fuse(scale_shift, *(randn(*s, dtype=dtype) for s in ((B, T, D), (B, 1, D), (B, 1, D))))
        names |= set(report.sources)
    assert len(names) == 2  # one per dtype; the same expression and dtype is the same kernel


def test_mixed_dtypes_keep_eager_promotion():
    # bf16 activations, fp32 modulation: eager returns fp32, which adaln_modulate (x's dtype) would
    # not, so the generated kernel (promoting like eager) is used.
    def block(x, shift, scale):
        return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    ops, _ = fuse(block, randn(B, T, D, dtype=torch.bfloat16), randn(B, D), randn(B, D))
    assert ops == ["ditfx::fused_elementwise"]


def test_what_does_not_fit_is_left_alone():
    def affine_norm(x, shift, scale, weight):  # LayerNorm with affine parameters
        return F.layer_norm(x, (D,), weight, None, 1e-6) * (1 + scale[:, None]) + shift[:, None]

    def per_channel_gate(x, y, weight):  # a (D,) gate is not per sample
        return x + weight * y

    def float64(x, gate, y):  # the kernels load fp32/fp16/bf16
        return x + gate[:, None] * y

    assert fuse(affine_norm, randn(B, T, D), randn(B, D), randn(B, D), randn(D))[0] == []
    assert fuse(per_channel_gate, randn(B, T, D), randn(B, T, D), randn(D))[0] == []
    f64 = torch.float64
    assert fuse(float64, randn(B, T, D, dtype=f64), randn(B, D, dtype=f64), randn(B, T, D, dtype=f64))[0] == []


def test_a_2d_operand_is_not_read_as_per_sample():
    # A (B, D) tensor meeting a (B, T, D) one broadcasts as (1, T, D) (here T == B): it varies over
    # tokens, not samples, so it must not be read as a per-sample gate.
    def pos_gate(x, pos, y):
        return x + pos * y

    ops, _ = fuse(pos_gate, randn(B, B, D), randn(B, D), randn(B, B, D))
    assert ops == []
