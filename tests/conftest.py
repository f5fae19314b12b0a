"""Tiny models of every supported family (from ditfx.models.zoo), and the loops the tests drive them with."""
from __future__ import annotations

import torch

from ditfx.models import zoo

FAMILIES = ("reference", "dit", "pixart", "sd3", "flux")


def tiny_model(family: str, batch: int = 2, seed: int = 0):
    """(model, kwargs of one call) for a tiny random model of ``family``."""
    named = zoo.load("DiT-T/2" if family == "reference" else f"tiny:{family}", batch=batch, seed=seed)
    return named.model, named.inputs


def call(model, kw: dict, family: str):
    return model(**kw) if family == "reference" else model(**kw, return_dict=False)[0]


def run_loop(model, kw: dict, family: str, steps: int = 8) -> torch.Tensor:
    """A small Euler loop over decreasing timesteps, as a sampler would drive the denoiser."""
    reference = family == "reference"
    named = zoo.NamedModel(model, kw, "x" if reference else "hidden_states", "t" if reference else "timestep",
                           1.0 if family == "flux" else 1000.0, not reference)
    return zoo.run_loop(named, steps=steps)
