"""Each op's Triton kernel, launched directly under the Triton interpreter, against its reference.

Tiny float32 CPU tensors only: the interpreter runs one program at a time in numpy and has no
bfloat16. ``TRITON_INTERPRET=1`` must be set before triton is imported, so these tests run in
their own process (``tests/kernels/test_interpreter_process.py``) and skip anywhere else.
"""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs TRITON_INTERPRET=1 before triton is imported; "
        "run in a subprocess by tests/kernels/test_interpreter_process.py",
    ),
]

pytest.importorskip("triton")

from ditfx.kernels.adaln_modulate.reference import adaln_modulate_reference
from ditfx.kernels.adaln_modulate.triton_kernel import adaln_modulate_launch
from ditfx.kernels.cache_residual.reference import (
    cache_residual_reference,
    cache_residual_sums_reference,
    relative_l1_from_sums,
)
from ditfx.kernels.cache_residual.triton_kernel import cache_residual_launch
from ditfx.kernels.gated_residual.reference import gated_residual_reference
from ditfx.kernels.gated_residual.triton_kernel import gated_residual_launch
from ditfx.kernels.testing import make_inputs

MAX_ABS_ERR = 1e-5


def cache_residual_change_launch(out, inp, cached, **kwargs):
    """The kernel's sums as the relative change (``cache_residual``'s public result): a ratio near 1
    compares within 1e-5, where the sums themselves are ~100 (see ``test_cache_residual_sums``)."""
    residual, num, den = cache_residual_launch(out, inp, cached, **kwargs)
    return residual, relative_l1_from_sums(num, den)

# (op, variant, launcher, reference, launcher keyword arguments). Small blocks force several
# programs per row and ragged last blocks, so masking and the 2-stage reductions are exercised.
CASES = [
    ("adaln_modulate", "per_sample", adaln_modulate_launch, adaln_modulate_reference, {}),
    ("adaln_modulate", "per_token", adaln_modulate_launch, adaln_modulate_reference, {}),
    (
        "gated_residual",
        "per_sample",
        gated_residual_launch,
        gated_residual_reference,
        {"block_m": 4, "block_d": 16},
    ),
    (
        "gated_residual",
        "per_token",
        gated_residual_launch,
        gated_residual_reference,
        {"block_m": 4, "block_d": 16},
    ),
    ("cache_residual", "full", cache_residual_change_launch, cache_residual_reference, {"block": 32}),
    ("cache_residual", "full", cache_residual_change_launch, cache_residual_reference, {}),
]


def assert_max_abs_err(actual, expected):
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert (a - e).abs().max().item() <= MAX_ABS_ERR


@pytest.mark.parametrize("shape", [(2, 5, 24), (1, 3, 64)])
@pytest.mark.parametrize(
    "op,variant,launch,reference,kwargs", CASES, ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in CASES]
)
def test_kernel_matches_reference(op, variant, launch, reference, kwargs, shape):
    args = make_inputs(op, variant, *shape, torch.float32)
    assert_max_abs_err(launch(*args, **kwargs), reference(*args))


@pytest.mark.parametrize("block", [32, 4096])
def test_cache_residual_sums(block):
    args = make_inputs("cache_residual", "full", 3, 7, 40, torch.float32)
    for got, expected in zip(cache_residual_launch(*args, block=block), cache_residual_sums_reference(*args)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_cache_residual_zero_cached():
    out, inp, _ = make_inputs("cache_residual", "full", 2, 5, 24, torch.float32)
    inp[1] = out[1]
    _, num, den = cache_residual_launch(out, inp, torch.zeros_like(out), block=32)
    assert relative_l1_from_sums(num, den).tolist() == [float("inf"), 0.0]
