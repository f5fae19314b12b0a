"""A plain rectified-flow Euler sampler with classifier-free guidance, for the reference DiT.

Used by the CLI, the benchmarks and the tests; it calls the denoiser the way diffusers pipelines do: timesteps
as a tensor (sigma * 1000, decreasing), CFG as one batched call with the unconditional half first.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def flow_sigmas(steps: int) -> list[float]:
    """Noise levels 1 -> 1/steps (the last step lands on 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [1.0 - k / steps for k in range(steps + 1)]


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, class_labels: torch.Tensor, steps: int = 50,
           guidance_scale: float = 1.0, null_class: int | None = None,
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate ``dx/dsigma = v(x, sigma)`` from noise to data; ``model(x, t, y)`` predicts v (its first
    ``C`` output channels; a learned-sigma model's extra channels are ignored)."""
    cfg = guidance_scale > 1.0
    if cfg and null_class is None:
        raise ValueError("guidance_scale > 1 needs null_class (the label id of the unconditional class)")
    x = noise
    channels = noise.shape[1]
    sigmas = flow_sigmas(steps)
    for k in range(steps):
        t = torch.full((x.shape[0],), sigmas[k] * 1000.0, device=x.device)
        if cfg:
            null = torch.full_like(class_labels, null_class)
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, class_labels]))[:, :channels]
            uncond, cond = out.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        else:
            v = model(x, t, class_labels)[:, :channels]
        x = x + (sigmas[k + 1] - sigmas[k]) * v
        if progress is not None:
            progress(k + 1)
    return x
