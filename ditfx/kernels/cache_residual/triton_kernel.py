"""Triton kernel for the block-cache residual: one read of each input, partial sums per chunk.

Stage 1 (the kernel): program (b, c) handles ``BLOCK`` elements of sample b, writes the residual
and the chunk's two partial L1 sums. Stage 2 (one PyTorch sum per (B, chunks) buffer) adds the
partials. Partial sums instead of atomics keep the result deterministic.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _cache_residual_kernel(
    out_ptr,
    inp_ptr,
    cached_ptr,
    residual_ptr,
    num_ptr,
    den_ptr,
    N,
    n_chunks,
    BLOCK: tl.constexpr,
):
    """residual = out - inp; num[b, c] = sum|residual - cached|; den[b, c] = sum|cached|."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    # int64 offsets: B * N overflows int32 for large latents.
    offs = b.to(tl.int64) * N + idx

    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    i = tl.load(inp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cached = tl.load(cached_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    residual = o - i
    tl.store(residual_ptr + offs, residual.to(residual_ptr.dtype.element_ty), mask=mask)
    # Masked lanes loaded 0 for all three inputs, so they add 0 to both sums.
    tl.store(num_ptr + b * n_chunks + c, tl.sum(tl.abs(residual - cached), axis=0))
    tl.store(den_ptr + b * n_chunks + c, tl.sum(tl.abs(cached), axis=0))


def cache_residual_launch(
    out: torch.Tensor, inp: torch.Tensor, cached: torch.Tensor, *, block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residual, num, den)`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    ``block`` is the number of elements per program; rows longer than it are split into chunks
    whose partial sums are reduced in stage 2.
    """
    B = out.shape[0]
    N = out.numel() // B
    out = out.contiguous()
    inp = inp.contiguous()
    cached = cached.contiguous()
    residual = torch.empty_like(out)
    n_chunks = triton.cdiv(N, block)
    # Separate buffers, not views of one: wrap_triton's functionalization of mutated arguments
    # is simplest when they do not alias.
    num, den = (torch.empty((B, n_chunks), dtype=torch.float32, device=out.device) for _ in "nd")
    wrap_triton(_cache_residual_kernel)[(B, n_chunks)](
        out,
        inp,
        cached,
        residual,
        num,
        den,
        N,
        n_chunks,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return residual, num.sum(dim=1), den.sum(dim=1)
