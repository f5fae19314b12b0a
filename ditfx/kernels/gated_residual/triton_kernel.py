"""Triton kernel for the gated residual: 2-D tiles of BLOCK_M rows x BLOCK_D columns."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._common import modulation_view


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    gate_ptr,
    y_ptr,
    out_ptr,
    n_rows,
    T,
    D,
    gate_sb,
    gate_st,
    gate_sd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r, d] = x[r, d] + gate[b, t, d] * y[r, d] for rows r = b * T + t of the (B*T, D) view."""
    # int64 rows: B * T * D overflows int32 at large batch x resolution.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    mask = (rows < n_rows) & (cols < D)
    offs = rows * D + cols
    gate_offs = (rows // T) * gate_sb + (rows % T) * gate_st + cols * gate_sd

    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    gate = tl.load(gate_ptr + gate_offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual_launch(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    *,
    block_m: int = 8,
    block_d: int = 256,
) -> torch.Tensor:
    """Launch the kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    ``block_m`` x ``block_d`` is the tile per program (2048 elements by default).
    """
    B, T, D = x.shape
    x = x.contiguous()
    y = y.contiguous()
    gate = modulation_view(gate, x.shape)
    out = torch.empty_like(x)
    grid = (triton.cdiv(B * T, block_m), triton.cdiv(D, block_d))
    wrap_triton(_gated_residual_kernel)[grid](
        x, gate, y, out, B * T, T, D, *gate.stride(), BLOCK_M=block_m, BLOCK_D=block_d
    )
    return out
