"""Triton kernel for AdaLN modulation: one program per (b, t) row, the whole row in registers."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._common import modulation_view


@triton.jit
def _adaln_modulate_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,
    T,
    D,
    shift_sb,
    shift_st,
    shift_sd,
    scale_sb,
    scale_st,
    scale_sd,
    eps,
    BLOCK_D: tl.constexpr,
):
    """out[r] = (x[r] - mean) * rsqrt(var + eps) * (1 + scale[b, t]) + shift[b, t], r = b * T + t.

    shift/scale are read through their (b, t, d) strides; per-sample inputs have stride 0 over t.
    """
    # int64 row index: B * T * D overflows int32 at large batch x resolution.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    # Centre before squaring (two-pass in registers) for the same accuracy as F.layer_norm.
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    # Inductor passes float scalars as fp64; cast so the row math stays in fp32.
    y = xc * tl.rsqrt(var + tl.cast(eps, tl.float32))

    shift = tl.load(shift_ptr + b * shift_sb + t * shift_st + cols * shift_sd, mask=mask)
    scale = tl.load(scale_ptr + b * scale_sb + t * scale_st + cols * scale_sd, mask=mask)
    out = y * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def adaln_modulate_launch(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """Launch the kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)."""
    B, T, D = x.shape
    x = x.contiguous()
    shift = modulation_view(shift, x.shape)
    scale = modulation_view(scale, x.shape)
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(D)
    num_warps = 4 if block_d <= 1024 else 8
    wrap_triton(_adaln_modulate_kernel)[(B * T,)](
        x,
        shift,
        scale,
        out,
        T,
        D,
        *shift.stride(),
        *scale.stride(),
        eps,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
