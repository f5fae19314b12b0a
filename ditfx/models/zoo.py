"""Named models for the CLI, the benchmarks and the tests: the reference DiT configs and tiny diffusers DiTs.

Names: any reference config (``DiT-S/2``, ``DiT-XL/2``, ``DiT-T/2``, ...), or ``tiny:<family>`` with family
one of ``dit``, ``pixart``, ``sd3``, ``flux`` (random diffusers models of a few blocks). Nothing downloads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditfx.models.dit import DIT_CONFIGS, build_dit

TINY_FAMILIES = ("dit", "pixart", "sd3", "flux")


@dataclass
class NamedModel:
    model: torch.nn.Module
    inputs: dict[str, Any]  # keyword arguments of one denoiser call
    latents: str  # which input holds the latents
    timestep: str  # which input holds the timestep
    time_scale: float  # timestep at noise level 1
    diffusers: bool  # diffusers models take return_dict=False and return a tuple

    def __call__(self, model=None, **overrides):
        out = (self.model if model is None else model)(**{**self.inputs, **overrides}, **({"return_dict": False} if self.diffusers else {}))
        return out[0] if self.diffusers else out


def names() -> list[str]:
    return list(DIT_CONFIGS) + [f"tiny:{f}" for f in TINY_FAMILIES]


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised adaLN gates would hide every block's contribution."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def load(name: str, batch: int = 2, seed: int = 0) -> NamedModel:
    """A random-weight model by name with inputs for one call at ``batch``."""
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 700.0)
    if name in DIT_CONFIGS:
        torch.manual_seed(seed)
        m = build_dit(name)
        cfg = m.config
        if name != "DiT-T/2":
            m.eval()  # official initialisation (the block outputs start at zero, like a fresh DiT)
        else:
            randomize(m, seed)
        x = r(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        return NamedModel(m, dict(x=x, t=t, y=torch.arange(batch) % cfg.num_classes), "x", "t", 1000.0, False)
    family = name.removeprefix("tiny:")
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(names())}")
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel)

    torch.manual_seed(seed)
    if family == "dit":
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        kw = dict(hidden_states=r(batch, 4, 8, 8), timestep=t, class_labels=torch.arange(batch) % 10)
    elif family == "pixart":
        m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=4, sample_size=8, patch_size=2, cross_attention_dim=16,
                                     caption_channels=12)
        kw = dict(hidden_states=r(batch, 4, 8, 8), timestep=t, encoder_hidden_states=r(batch, 5, 12),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif family == "sd3":
        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16)
        kw = dict(hidden_states=r(batch, 4, 8, 8), timestep=t, encoder_hidden_states=r(batch, 5, 12),
                  pooled_projections=r(batch, 10))
    else:
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
        kw = dict(hidden_states=r(batch, 16, 16), timestep=t / 1000, encoder_hidden_states=r(batch, 5, 12),
                  pooled_projections=r(batch, 10), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
        return NamedModel(randomize(m, seed), kw, "hidden_states", "timestep", 1.0, True)
    return NamedModel(randomize(m, seed), kw, "hidden_states", "timestep", 1000.0, True)


@torch.no_grad()
def run_loop(named: NamedModel, model=None, steps: int = 8, progress=None) -> torch.Tensor:
    """A small Euler loop over decreasing timesteps, driving the denoiser as a sampler does."""
    x = named.inputs[named.latents]
    batch = x.shape[0]
    for k in range(steps):
        t = torch.full((batch,), (1 - k / steps) * named.time_scale)
        v = named(model, **{named.latents: x, named.timestep: t})[:, : x.shape[1]]
        x = x - v / steps
        if progress is not None:
            progress(k + 1)
    return x
