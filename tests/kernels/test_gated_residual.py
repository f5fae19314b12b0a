"""ditfx::gated_residual on CPU: float64 oracle, broadcast kinds, opcheck, compile and export."""

import pytest
import torch

from ditfx.kernels import gated_residual
from ditfx.kernels.gated_residual import gated_residual_reference
from ditfx.kernels.testing import (
    VARIANTS,
    assert_close,
    assert_compiles,
    assert_export_keeps_op,
    make_inputs,
    to_float64,
)

OP = "gated_residual"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 24), (3, 7, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS[OP])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, variant, dtype):
    args = make_inputs(OP, variant, *shape, dtype)
    out = gated_residual(*args)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, gated_residual_reference(*to_float64(args)), dtype)


def test_per_sample_is_dit_gate():
    # DiT writes the per-sample gate as gate.unsqueeze(1).
    x, gate, y = make_inputs(OP, "per_sample", 2, 5, 24, torch.float64)
    torch.testing.assert_close(gated_residual(x, gate, y), x + gate.unsqueeze(1) * y)
    torch.testing.assert_close(gated_residual(x, gate[:, None], y), x + gate.unsqueeze(1) * y)


def test_rejects_bad_shapes():
    x, gate, y = make_inputs(OP, "per_sample", 2, 5, 24, torch.float32)
    with pytest.raises(ValueError, match="gate"):
        gated_residual(x, gate[:1], y)
    with pytest.raises(ValueError, match="equal shapes"):
        gated_residual(x, gate, y[:, :3])


@pytest.mark.parametrize("variant", VARIANTS[OP])
def test_opcheck(variant):
    args = make_inputs(OP, variant, 2, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.ditfx.gated_residual.default, args)


class _GatedResidual(torch.nn.Module):
    def forward(self, x, gate, y):
        return gated_residual(x, gate, torch.relu(y))


def test_compile_and_export_on_cpu():
    args = make_inputs(OP, "per_token", 2, 5, 24, torch.float32)
    assert_compiles(_GatedResidual(), args)
    assert_export_keeps_op(_GatedResidual(), args, OP)
