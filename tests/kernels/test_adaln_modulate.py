"""ditfx::adaln_modulate on CPU: float64 oracle, broadcast kinds, opcheck, compile and export."""

import pytest
import torch

from ditfx.kernels import adaln_modulate
from ditfx.kernels.adaln_modulate import adaln_modulate_reference
from ditfx.kernels.testing import (
    VARIANTS,
    assert_close,
    assert_compiles,
    assert_export_keeps_op,
    make_inputs,
    to_float64,
)

OP = "adaln_modulate"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 24), (3, 7, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS[OP])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, variant, dtype):
    args = make_inputs(OP, variant, *shape, dtype)
    out = adaln_modulate(*args)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, adaln_modulate_reference(*to_float64(args)), dtype)


def test_is_layernorm_then_modulate():
    # Independent of the reference: the DiT formula written out in float64.
    x, shift, scale, eps = to_float64(make_inputs(OP, "per_sample", 2, 5, 24, torch.float64))
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(adaln_modulate(x, shift, scale, eps), expected)


def test_per_sample_equals_expanded_per_token():
    x, shift, scale, _ = make_inputs(OP, "per_sample", 2, 5, 24, torch.float32)
    expanded = [v[:, None].expand(x.shape).contiguous() for v in (shift, scale)]
    out = adaln_modulate(x, shift, scale)
    torch.testing.assert_close(out, adaln_modulate(x, *expanded), rtol=0, atol=0)
    torch.testing.assert_close(out, adaln_modulate(x, shift[:, None], scale[:, None]))


def test_rejects_bad_shapes():
    x, shift, scale, _ = make_inputs(OP, "per_sample", 2, 5, 24, torch.float32)
    with pytest.raises(ValueError, match="shift"):
        adaln_modulate(x, shift[:, :8], scale)
    with pytest.raises(ValueError, match="x must be"):
        adaln_modulate(x[0], shift, scale)


@pytest.mark.parametrize("variant", VARIANTS[OP])
def test_opcheck(variant):
    args = make_inputs(OP, variant, 2, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.ditfx.adaln_modulate.default, args)


class _Modulate(torch.nn.Module):
    def forward(self, x, shift, scale):
        return adaln_modulate(x, shift, scale, 1e-6) * 2


def test_compile_and_export_on_cpu():
    args = make_inputs(OP, "per_sample", 2, 5, 24, torch.float32)[:3]
    assert_compiles(_Modulate(), args)
    assert_export_keeps_op(_Modulate(), args, OP)
