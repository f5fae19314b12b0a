"""ditfx::cfg_combine on CPU: float64 oracle, cosine edge cases, opcheck, compile and export."""

import pytest
import torch
import torch.nn.functional as F

from ditfx.kernels import cfg_combine
from ditfx.kernels.cfg_combine import cfg_combine_reference
from ditfx.kernels.testing import (
    assert_close,
    assert_compiles,
    assert_export_keeps_op,
    make_inputs,
    to_float64,
)

OP = "cfg_combine"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 24), (3, 7, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype):
    args = make_inputs(OP, "full", *shape, dtype)
    guided, cosine = cfg_combine(*args)
    expected_guided, expected_cosine = cfg_combine_reference(*to_float64(args))
    assert guided.shape == shape and guided.dtype == dtype
    assert cosine.shape == (shape[0],) and cosine.dtype == torch.float32
    assert_close(guided, expected_guided, dtype)
    assert_close(cosine, expected_cosine, torch.float32)


def test_matches_diffusers_cfg_and_torch_cosine():
    uncond, cond, s = make_inputs(OP, "full", 3, 4, 8, torch.float64)
    guided, cosine = cfg_combine(uncond, cond, s)
    torch.testing.assert_close(guided, uncond + s * (cond - uncond))
    expected = F.cosine_similarity(cond.flatten(1), uncond.flatten(1), dim=1).float()
    torch.testing.assert_close(cosine, expected)


def test_cosine_edge_cases():
    uncond, cond, _ = make_inputs(OP, "full", 3, 4, 8, torch.float32)
    cond[0] = uncond[0]
    cond[1] = -2 * uncond[1]
    cond[2] = 0  # all-zero input: cosine 0, not NaN
    guided, cosine = cfg_combine(uncond, cond, 1.0)
    torch.testing.assert_close(cosine, torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(guided, cond)  # s = 1 returns the conditional prediction


def test_rejects_bad_shapes():
    uncond, cond, s = make_inputs(OP, "full", 2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        cfg_combine(uncond, cond[:, :2], s)


def test_opcheck():
    args = make_inputs(OP, "full", 2, 5, 24, torch.float32)
    torch.library.opcheck(torch.ops.ditfx.cfg_combine.default, args)


class _Guidance(torch.nn.Module):
    def forward(self, uncond, cond):
        guided, cosine = cfg_combine(uncond, cond, 4.5)
        return guided, cosine.mean()


def test_compile_and_export_on_cpu():
    args = make_inputs(OP, "full", 2, 5, 24, torch.float32)[:2]
    assert_compiles(_Guidance(), args)
    assert_export_keeps_op(_Guidance(), args, OP)
