"""Tiny models of every supported family (from ditfx.models.zoo), and the loops the tests drive them with.

The zoo is the one source of truth: which families exist, their inputs, and how a loop drives them (which input
holds the latents and the timestep, and the timestep's scale). Also: the ``load_benchmark`` fixture, which loads a
script of benchmarks/ for the tests of its pure parts.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ditfx.api import null_class
from ditfx.models import zoo

FAMILIES = ("reference",) + zoo.TINY_FAMILIES

if os.environ.get("PYTEST_XDIST_WORKER"):  # the cores shared by the workers, not each taking them all
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a test (``pytestmark = pytest.mark.usefixtures(...)``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def between(values, k: int) -> float:
    """A threshold between the k-th and (k+1)-th smallest distinct measured values, never on one: the same values
    measured again (another CPU, a sample alone) round either side of themselves, and a threshold equal to one
    decides differently there."""
    v = sorted({float(x) for x in values if x == x})
    return (v[k] + v[k + 1]) / 2


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


def _rows(value, rows: slice, batch: int):
    """``value`` restricted to ``rows`` when it is a per-sample tensor (or a dict of them)."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0 and a.shape[1:] == b.shape[1:] \
            and a is not b:
        return torch.cat([a, b])
    return a


def _swap(value, half: int, batch: int):
    if isinstance(value, dict):
        return {k: _swap(v, half, batch) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value[half:], value[:half]])
    return value


@torch.no_grad()
def cfg_loop(model, kw: dict, family: str, steps: int = 8, scale: float = 3.0, two_calls: bool = False,
             uncond_first: bool = True, cfg_steps: int | None = None, fill: str = "cond") -> torch.Tensor:
    """Classifier-free guidance over a zoo model's inputs at batch 2B: rows [:B] of every per-sample input
    condition the unconditional branch, rows [B:] the conditional one; the latents x (B samples) are shared.

    Batched (one call of 2B rows, the unconditional half first unless ``uncond_first=False``) or two calls per
    step. ``cfg_steps``: guidance on the first so many steps only, conditional-only after (the expected result
    of guidance skipping); None: every step. ``fill="delta"``: after the guided steps the conditional prediction
    plus the last guided step's ``(scale - 1) * (c_k - u_k)``, fading with ``t / t_k`` (AdaptiveGuidance's
    default fill).
    """
    latents, timestep, scale_t, diffusers = _driving(family)
    batch = kw[latents].shape[0]
    half = batch // 2
    uncond = {k: _rows(v, slice(0, half), batch) for k, v in kw.items()}
    cond = {k: _rows(v, slice(half, batch), batch) for k, v in kw.items()}
    null = model.null_class if hasattr(model, "null_class") else null_class(model)  # a loaded package states it
    for k, v in uncond.items():  # a class-conditional model's unconditional branch is its null class
        if null is not None and isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point():
            uncond[k] = torch.full_like(v, null)
    kw = {k: _cat(uncond[k], cond[k]) for k in kw}
    x = kw[latents][half:].clone()

    def run(inputs, x, t):
        named = zoo.NamedModel(model, {**inputs, latents: x, timestep: torch.full((x.shape[0],), t)},
                               latents, timestep, scale_t, diffusers)
        return named()[:, : x.shape[1]]

    last_guided = None  # (c_k - u_k, t_k) of the last guided step
    for k in range(steps):
        t = (1 - k / steps) * scale_t
        if cfg_steps is not None and k >= cfg_steps:
            v = run(cond, x, t)
            if fill == "delta":
                direction, t_k = last_guided
                v = v + (scale - 1) * direction * (t / t_k)
            x = x - v / steps
            continue
        if two_calls:
            first, second = (uncond, cond) if uncond_first else (cond, uncond)
            a, b = run(first, x, t), run(second, x, t)
            u, c = (a, b) if uncond_first else (b, a)
            v = u + scale * (c - u)
        else:
            # kw's rows are already [uncond | cond]; the other layout swaps the halves
            both = kw if uncond_first else {k: _swap(v, half, batch) for k, v in kw.items()}
            out = run(both, torch.cat([x, x]), t)
            u, c = (out[:half], out[half:]) if uncond_first else (out[half:], out[:half])
            v = u + scale * (c - u)
        last_guided = (c - u, t)
        x = x - v / steps
    return x


def function_graph(fn, *args) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's graph of ``fn`` and its inputs in the graph's order."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=keep, fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    return graphs[0]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(script: str) -> ModuleType:
    """A script of benchmarks/ as a module, as running it would: with benchmarks/ on the import path (the scripts
    import reporting.py and each other from beside them) and registered under its name (dataclasses and Dynamo
    look a function's module up by name)."""
    name = f"bench_{script}"
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("peers")``: benchmarks/peers.py as a module."""
    return _load_benchmark
