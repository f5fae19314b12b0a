"""ditfx::cache_residual on CPU: float64 oracle, zero denominators, opcheck, compile, export."""

import math

import pytest
import torch

from ditfx.kernels import cache_residual, cache_residual_sums
from ditfx.kernels.cache_residual import cache_residual_reference, cache_residual_sums_reference
from ditfx.kernels.testing import (
    assert_close,
    assert_compiles,
    assert_export_keeps_op,
    make_inputs,
    to_float64,
)

OP = "cache_residual"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 24), (3, 7, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype):
    args = make_inputs(OP, "full", *shape, dtype)
    residual, change = cache_residual(*args)
    expected_residual, expected_change = cache_residual_reference(*to_float64(args))
    assert residual.shape == shape and residual.dtype == dtype
    assert change.shape == (shape[0],) and change.dtype == torch.float32
    assert_close(residual, expected_residual, dtype)
    # The change is a float32 reduction of exactly upcast inputs, whatever the input dtype.
    assert_close(change, expected_change, torch.float32)


def test_change_is_relative_l1_per_sample():
    out, inp, cached = make_inputs(OP, "full", 3, 4, 8, torch.float64)
    _, change = cache_residual(out, inp, cached)
    for b in range(3):
        r = out[b] - inp[b]
        expected = (r - cached[b]).abs().sum() / cached[b].abs().sum()
        assert math.isclose(change[b].item(), expected.item(), rel_tol=1e-6)


def test_zero_cached_residual():
    out, inp, _ = make_inputs(OP, "full", 2, 4, 8, torch.float32)
    inp[1] = out[1]  # sample 1: residual 0, so the numerator is 0 too
    residual, change = cache_residual(out, inp, torch.zeros_like(out))
    assert change.tolist() == [math.inf, 0.0]
    torch.testing.assert_close(residual, out - inp)


def test_non_3d_latents():
    # Reductions run over all non-batch dims, so (B, C, H, W) latents work as well.
    args = make_inputs(OP, "full", 2, 4, 6, torch.float32)
    args = tuple(a.reshape(2, 4, 3, 2) for a in args)
    residual, change = cache_residual(*args)
    assert residual.shape == (2, 4, 3, 2) and change.shape == (2,)


def test_rejects_bad_shapes():
    out, inp, cached = make_inputs(OP, "full", 2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        cache_residual(out, inp, cached[:1])


def test_opcheck():
    args = make_inputs(OP, "full", 2, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.ditfx.cache_residual.default, args)


class _CacheStep(torch.nn.Module):
    def forward(self, out, inp, cached):
        residual, change = cache_residual(out, inp, cached)
        return residual, change < 0.1


def test_compile_and_export_on_cpu():
    args = make_inputs(OP, "full", 2, 5, 24, torch.float32)
    assert_compiles(_CacheStep(), args)
    assert_export_keeps_op(_CacheStep(), args, OP)


def test_sums_are_the_op_and_change_their_ratio():
    # The op returns the sums (a per-batch decision adds them over samples before dividing).
    args = make_inputs(OP, "full", 3, 5, 24, torch.float32)
    residual, num, den = cache_residual_sums(*args)
    expected = cache_residual_sums_reference(*to_float64(args))
    assert num.dtype == den.dtype == torch.float32 and num.shape == den.shape == (3,)
    for got, want in zip((residual, num, den), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cache_residual(*args)[1], num / den)
