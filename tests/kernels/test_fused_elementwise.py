"""ditfx::fused_elementwise on CPU: float64 oracle, kinds, dtypes, opcheck, compile and export."""

import pytest
import sympy
import torch
import torch.nn.functional as F

from ditfx.kernels import fused_elementwise
from ditfx.kernels.expression import to_text
from ditfx.kernels.testing import assert_close, assert_compiles, assert_export_keeps_op

x, scale, shift, gate, y = sympy.symbols("x scale shift gate y")
B, T, D = 2, 5, 24
SHAPES = {"full": (B, T, D), "per_sample": (B, D), "per_token": (B, T, 1), "scalar": ()}

# (expression, kinds, layer_norm_eps): the adaLN family and gated residuals the fusion pass emits.
CASES = [
    (x * (1 + scale) + shift, {"x": "full", "scale": "per_sample", "shift": "per_sample"}, 1e-6),
    (x * scale + shift, {"x": "full", "scale": "per_sample", "shift": "per_sample"}, 1e-5),
    (x * (1 + scale) + shift, {"x": "full", "scale": "per_token", "shift": "scalar"}, 1e-6),
    (x + gate * y, {"x": "full", "gate": "per_token", "y": "full"}, None),
    (x + gate * y / 2, {"x": "full", "gate": "per_sample", "y": "full"}, None),
]


def make(kinds, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPES[k], generator=g).to(dtype) for k in kinds.values()]


def oracle(expr, kinds, inputs, eps):
    """The expression in float64, broadcasting written out by hand."""
    values = {}
    for i, (name, kind) in enumerate(kinds.items()):
        v = inputs[i].double()
        v = v[:, None] if kind == "per_sample" else v
        values[name] = F.layer_norm(v, (D,), eps=eps) if i == 0 and eps is not None else v
    return sympy.lambdify(list(kinds), expr)(*values.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_oracle(case, dtype):
    expr, kinds, eps = CASES[case]
    inputs = make(kinds, dtype)
    out = fused_elementwise(expr, kinds, inputs, eps)
    assert out.shape == (B, T, D) and out.dtype == dtype
    assert_close(out, oracle(expr, kinds, inputs, eps), dtype)


def test_per_sample_as_b1d_and_mixed_dtypes():
    kinds = {"x": "full", "scale": "per_sample", "shift": "per_sample"}
    xt, st, ht = make(kinds, torch.float32)
    out = fused_elementwise(x * scale + shift, kinds, [xt, st[:, None], ht], 1e-6)
    torch.testing.assert_close(out, fused_elementwise(x * scale + shift, kinds, [xt, st, ht], 1e-6))
    # bf16 activations with fp32 modulation promote to fp32, as eager PyTorch does.
    assert fused_elementwise(x * scale + shift, kinds, [xt.bfloat16(), st, ht]).dtype == torch.float32


def test_rejects_bad_shapes_and_specs():
    kinds = {"x": "full", "scale": "per_sample", "shift": "per_sample"}
    xt, st, ht = make(kinds, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        fused_elementwise(x * scale + shift, kinds, [xt, st[:, :3], ht])
    with pytest.raises(ValueError, match="kind"):
        fused_elementwise(x * scale, {"x": "full", "scale": "rowwise"}, [xt, st])
    with pytest.raises(ValueError, match="normalised"):
        fused_elementwise(x * scale + shift, {"scale": "per_sample", "x": "full", "shift": "per_sample"},
                          [st, xt, ht], 1e-6)


def test_opcheck():
    for expr, kinds, eps in CASES:
        from ditfx.kernels.fused_elementwise.spec import format_spec

        args = (to_text(expr), format_spec(kinds), make(kinds, torch.float32), eps)
        torch.library.opcheck(torch.ops.ditfx.fused_elementwise.default, args)


class _AdaLN(torch.nn.Module):
    def forward(self, x_, scale_, shift_):
        kinds = {"x": "full", "scale": "per_sample", "shift": "per_sample"}
        return fused_elementwise("shift + x*(scale + 1)", kinds, [x_, scale_, shift_], 1e-6) * 2


def test_compile_and_export_on_cpu():
    args = tuple(make({"x": "full", "scale": "per_sample", "shift": "per_sample"}, torch.float32))
    assert_compiles(_AdaLN(), args)
    assert_export_keeps_op(_AdaLN(), args, "fused_elementwise")
