"""Registration of ``torch.ops.ditfx.cfg_combine`` and its public entry point."""

import torch

from .._common import check_same_shape
from .reference import cfg_combine_reference


@torch.library.triton_op("ditfx::cfg_combine", mutates_args=())
def _cfg_combine_op(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # Triton cannot trace without a GPU driver, so non-CUDA tensors take the reference.
    if uncond.device.type != "cuda":
        return cfg_combine_reference(uncond, cond, guidance_scale)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import cfg_combine_launch

    return cfg_combine_launch(uncond, cond, guidance_scale)


def cfg_combine(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused CFG update and per-sample cosine similarity of cond and uncond.

    Args:
        uncond: ``(B, ...)`` unconditional prediction, float32/float16/bfloat16.
        cond: ``(B, ...)`` conditional prediction.
        guidance_scale: the CFG scale ``s``.

    Returns:
        ``(uncond + s * (cond - uncond), cosine)``: the guided prediction in uncond's dtype and
        ``cosine`` ``(B,)`` float32 (0 when either input is all zeros).
    """
    check_same_shape(uncond=uncond, cond=cond)
    return torch.ops.ditfx.cfg_combine.default(uncond, cond, float(guidance_scale))
