"""Tiny models of every supported family, and helpers shared by the tests."""
from __future__ import annotations

import pytest
import torch

import ditfx
from ditfx.models import build_dit

FAMILIES = ("reference", "dit", "pixart", "sd3", "flux")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised adaLN gates would hide every block's contribution."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_model(family: str, batch: int = 2, seed: int = 0):
    """(model, kwargs of one call) for a tiny random model of ``family``."""
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel)

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 700.0)
    if family == "reference":
        m = build_dit("DiT-T/2")
        kw = dict(x=r(batch, 4, 8, 8), t=t, y=torch.arange(batch) % 10)
    elif family == "dit":
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
    elif family == "flux":
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
        kw = dict(hidden_states=r(batch, 16, 16), timestep=t / 1000, encoder_hidden_states=r(batch, 5, 12),
                  pooled_projections=r(batch, 10), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    else:
        raise ValueError(family)
    return randomize(m, seed), kw


def call(model, kw: dict, family: str):
    out = model(**kw) if family == "reference" else model(**kw, return_dict=False)[0]
    return out


def latent_key(family: str) -> str:
    return "x" if family == "reference" else "hidden_states"


def time_key(family: str) -> str:
    return "t" if family == "reference" else "timestep"


def run_loop(model, kw: dict, family: str, steps: int = 8) -> torch.Tensor:
    """A small Euler loop over decreasing timesteps, as a sampler would drive the denoiser."""
    x = kw[latent_key(family)]
    scale = 1.0 if family == "flux" else 1000.0
    with torch.no_grad():
        for k in range(steps):
            sigma = 1.0 - k / steps
            t = torch.full((x.shape[0],), sigma * scale)
            v = call(model, {**kw, latent_key(family): x, time_key(family): t}, family)[:, : x.shape[1]]
            x = x - v / steps
    return x


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


__all__ = ["ditfx"]
