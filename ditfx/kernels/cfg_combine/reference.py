"""Reference classifier-free guidance combine with the cond/uncond cosine similarity.

``uncond + s * (cond - uncond)`` is the CFG update (Ho & Salimans, 2022). The per-sample cosine
of the two predictions is what guidance-skipping heuristics watch: when cond and uncond agree,
later steps can skip the unconditional pass.
"""

import torch

from .._common import upcast

COSINE_EPS = 1e-8


def cosine_from_sums(dot: torch.Tensor, cc: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:
    """``dot / max(sqrt(cc) * sqrt(uu), 1e-8)`` as float32; shared with the Triton path.

    ``cc`` and ``uu`` are the squared norms. The norms are taken separately so their product
    cannot overflow; the clamp (as in ``F.cosine_similarity``'s documented formula) makes an
    all-zero input give 0 instead of NaN.
    """
    return (dot / (cc.sqrt() * uu.sqrt()).clamp_min(COSINE_EPS)).to(torch.float32)


def cfg_combine_reference(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(uncond + s * (cond - uncond), cosine)``.

    Args:
        uncond: ``(B, ...)`` unconditional prediction.
        cond: ``(B, ...)`` conditional prediction.
        guidance_scale: the CFG scale ``s``.

    Returns:
        The guided prediction in uncond's dtype, and the cosine similarity of cond and uncond
        flattened over non-batch dims, ``(B,)`` float32.
    """
    u = upcast(uncond)
    c = upcast(cond)
    guided = u + guidance_scale * (c - u)
    dot = (c * u).flatten(1).sum(1)
    cc = (c * c).flatten(1).sum(1)
    uu = (u * u).flatten(1).sum(1)
    return guided.to(uncond.dtype), cosine_from_sums(dot, cc, uu)
