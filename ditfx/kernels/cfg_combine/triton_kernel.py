"""Triton kernel for the CFG combine: one read of cond and uncond, partial sums per chunk.

Stage 1 (the kernel): program (b, c) handles ``BLOCK`` elements of sample b, writes the guided
output and the chunk's partial dot product and squared norms. Stage 2 (PyTorch on three (B, chunks)
buffers) adds the partials; partial sums instead of atomics keep the result deterministic.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .reference import cosine_from_sums


@triton.jit
def _cfg_combine_kernel(
    uncond_ptr,
    cond_ptr,
    guided_ptr,
    dot_ptr,
    cc_ptr,
    uu_ptr,
    guidance_scale,
    N,
    n_chunks,
    BLOCK: tl.constexpr,
):
    """guided = u + s * (c - u); dot[b, k] = sum c*u; cc[b, k] = sum c*c; uu[b, k] = sum u*u."""
    b = tl.program_id(0)
    k = tl.program_id(1)
    idx = k * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    # int64 offsets: B * N overflows int32 for large latents.
    offs = b.to(tl.int64) * N + idx

    u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Inductor passes float scalars as fp64; cast so the update stays in fp32.
    guided = u + tl.cast(guidance_scale, tl.float32) * (c - u)
    tl.store(guided_ptr + offs, guided.to(guided_ptr.dtype.element_ty), mask=mask)
    # Masked lanes loaded 0, so they add 0 to every sum.
    tl.store(dot_ptr + b * n_chunks + k, tl.sum(c * u, axis=0))
    tl.store(cc_ptr + b * n_chunks + k, tl.sum(c * c, axis=0))
    tl.store(uu_ptr + b * n_chunks + k, tl.sum(u * u, axis=0))


def cfg_combine_launch(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, *, block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    ``block`` is the number of elements per program; rows longer than it are split into chunks
    whose partial sums are reduced in stage 2.
    """
    B = uncond.shape[0]
    N = uncond.numel() // B
    uncond = uncond.contiguous()
    cond = cond.contiguous()
    guided = torch.empty_like(uncond)
    n_chunks = triton.cdiv(N, block)
    # Separate buffers, not views of one: wrap_triton's functionalization of mutated arguments
    # is simplest when they do not alias.
    dot, cc, uu = (
        torch.empty((B, n_chunks), dtype=torch.float32, device=uncond.device) for _ in "dcu"
    )
    wrap_triton(_cfg_combine_kernel)[(B, n_chunks)](
        uncond,
        cond,
        guided,
        dot,
        cc,
        uu,
        guidance_scale,
        N,
        n_chunks,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return guided, cosine_from_sums(dot.sum(dim=1), cc.sum(dim=1), uu.sum(dim=1))
