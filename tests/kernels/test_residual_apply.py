"""ditfx::residual_apply on CPU: float64 oracle, optional scalars, opcheck, compile and export."""

import pytest
import torch

from ditfx.kernels import residual_apply
from ditfx.kernels.residual_apply import residual_apply_reference
from ditfx.kernels.testing import (
    VARIANTS,
    assert_close,
    assert_compiles,
    assert_export_keeps_op,
    make_inputs,
    to_float64,
)

OP = "residual_apply"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 24), (3, 7, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS[OP])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, variant, dtype):
    args = make_inputs(OP, variant, *shape, dtype)
    out = residual_apply(*args)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, residual_apply_reference(*to_float64(args)), dtype)


def test_optional_scalars():
    x, r, scale, shift = make_inputs(OP, "scale_shift", 2, 5, 24, torch.float64)
    torch.testing.assert_close(residual_apply(x, r), x + r)
    torch.testing.assert_close(residual_apply(x, r, scale), x + r * scale)
    torch.testing.assert_close(residual_apply(x, r, shift=shift), x + r + shift)
    torch.testing.assert_close(residual_apply(x, r, scale, shift), x + (r * scale + shift))


def test_rejects_non_scalar_scale():
    x, r = make_inputs(OP, "plain", 2, 5, 24, torch.float32)
    with pytest.raises(ValueError, match="0-d"):
        residual_apply(x, r, torch.ones(1))


@pytest.mark.parametrize("variant", VARIANTS[OP])
def test_opcheck(variant):
    args = make_inputs(OP, variant, 2, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.ditfx.residual_apply.default, args)


class _ApplyCached(torch.nn.Module):
    def forward(self, x, r, scale, shift):
        return residual_apply(x, r, scale, shift)


def test_compile_and_export_on_cpu():
    args = make_inputs(OP, "scale_shift", 2, 5, 24, torch.float32)
    assert_compiles(_ApplyCached(), args)
    assert_export_keeps_op(_ApplyCached(), args, OP)
