"""Recording a pipeline's denoiser calls: the training and calibration of token budgets and history attention
drive the pipeline as it will be used and learn from the calls it makes (no dataset)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Recorded:
    """One denoiser call: its inputs and the native prediction."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    u: float  # normalised time


def first_tensor(out) -> torch.Tensor:
    """The prediction in a denoiser's output: the tensor itself, the first of a tuple, or ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction in the denoiser's output {type(out).__name__}")


def timestep_of(args: tuple, kwargs: dict) -> float | None:
    for name in ("timestep", "timesteps", "t", "sigma"):
        t = kwargs.get(name)
        if t is not None:
            return float(torch.as_tensor(t).reshape(-1)[0])
    return float(args[1].reshape(-1)[0]) if len(args) > 1 and isinstance(args[1], torch.Tensor) else None


def detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(detach(v) for v in x)
    if isinstance(x, dict):
        return {k: detach(v) for k, v in x.items()}
    return x


def record_calls(denoiser: torch.nn.Module, run: Callable[[], object], time_scale: float,
                 weak_until: float) -> list[Recorded]:
    """The denoiser calls ``run()`` makes in the weak range, with their native predictions."""
    calls: list[Recorded] = []

    def hook(module, args, kwargs, out):
        t = timestep_of(args, kwargs)
        if t is None:
            raise ValueError("the denoiser was called without a timestep ditfx can read (keyword 'timestep' or the "
                             "second positional argument)")
        u = t / time_scale
        if u > 1 - weak_until - 1e-9:
            calls.append(Recorded(detach(args), detach(kwargs), first_tensor(out).detach().clone(), u))

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return calls
