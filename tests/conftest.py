"""Tiny models of every supported family (from ditfx.models.zoo), and the loops the tests drive them with.

The zoo is the one source of truth: which families exist, their inputs, and how a loop drives them (which input
holds the latents and the timestep, and the timestep's scale).
"""
from __future__ import annotations

import functools

import torch

from ditfx.models import zoo

FAMILIES = ("reference",) + zoo.TINY_FAMILIES


def _name(family: str) -> str:
    return "DiT-T/2" if family == "reference" else f"tiny:{family}"


def tiny_model(family: str, batch: int = 2, seed: int = 0):
    """(model, kwargs of one call) for a tiny random model of ``family``."""
    named = zoo.load(_name(family), batch=batch, seed=seed)
    return named.model, named.inputs


@functools.cache
def _driving(family: str) -> tuple[str, str, float, bool]:
    """(latents input, timestep input, time_scale, diffusers) of a family, read off a batch-1 zoo model."""
    n = zoo.load(_name(family), batch=1)
    return n.latents, n.timestep, n.time_scale, n.diffusers


def call(model, kw: dict, family: str):
    return zoo.NamedModel(model, kw, *_driving(family))()


def run_loop(model, kw: dict, family: str, steps: int = 8) -> torch.Tensor:
    """A small Euler loop over decreasing timesteps, as a sampler would drive the denoiser."""
    return zoo.run_loop(zoo.NamedModel(model, kw, *_driving(family)), steps=steps)
