"""ARD distillation: a few-step student with history attention, trained on its teacher's trajectories.

1. **Record** (:func:`record_trajectories`). For each generation the caller's ``run(pipe, index, **call)`` drives
   the pipeline twice with the same seed: once as the student will be driven (S steps at the student's noise
   levels, no guidance), to record the denoiser's own call arguments per step (the conditioning, the timestep),
   and once as the teacher (``teacher_steps`` steps with guidance), to record its latents at the student's noise
   levels (``callback_on_step_end``, as every diffusers pipeline offers) and at the end. The student's points are
   teacher steps ``floor(s * T / S)``, so each is a point of the teacher's trajectory, not an interpolation.
   What is kept there (``points``): by default, as ARD's reference code does (``predx0``), the teacher's *clean
   estimate* ``x_i - sigma_i * v_i`` (its guided velocity v_i read off the Euler step it took); the student's
   next step starts from that estimate, which no longer holds the noise the rest of the trajectory depends on, so
   a student without history must guess it and one with history reads it from the first step's keys and values
   (the exposure the history is for). ``points="noisy"`` keeps the teacher's latents instead: they hold
   everything, and on the digits model a student without history then matches one with it (docs/history.md).
2. **Train** (:func:`distill`). The student starts as a copy of the teacher (with step-specific output heads, each
   a copy of the teacher's de-embedding). Teacher forcing: the S steps of a batch of trajectories run as one call
   of the one-shot forward (:func:`~ditfx.history.oneshot.one_shot`: block-causal attention in the lower
   ``layers`` blocks, block-diagonal above; ``layers=0`` is plain step distillation), each step fed the teacher's
   point. The regression target of step s is the velocity that takes the teacher's point s to its point s + 1
   in one flow-matching Euler step at the student's noise levels, ``(x_{s+1} - x_s) / (sigma_{s+1} - sigma_s)``;
   the loss is its mean squared error over the S steps (ARD's regression loss, in the model's own output units).

The result is a :class:`~ditfx.history.student.HistoryStudent` (weights, heads, the schedule it was trained
for and a record with the loss curves).
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditfx.graph.meta import is_per_row
from ditfx.graph.sites import find_sites
from ditfx.graph.structure import analyse
from ditfx.history.oneshot import one_shot
from ditfx.history.student import HistoryStudent
from ditfx.recording import first_tensor
from ditfx.runtime.compiler import keep_dynamo_compiling

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
POINTS = ("denoised", "noisy")


@dataclass
class Trajectories:
    """Teacher trajectories at a student's S points: ``states[s]`` (M, ...) the teacher's point at ``sigmas[s]``
    (its clean estimate or its latents there, ``record["points"]``; ``states[0]``: the noise, ``states[S]``: its
    final latents, sigma 0), and per student step the denoiser's call arguments (``calls[s]``: keyword -> tensor
    with M rows, or a constant shared by every row)."""

    states: torch.Tensor  # (S + 1, M, *latent)
    sigmas: torch.Tensor  # (S + 1,), from 1 down to 0
    calls: list[dict]  # per step: {keyword: (M, ...) tensor | constant}
    record: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.calls)

    def __len__(self) -> int:
        return self.states.shape[1]

    def split(self, held_out: int) -> tuple[Trajectories, Trajectories]:
        """(the first M - held_out trajectories, the last held_out)."""
        m = len(self) - held_out
        if m < 1 or held_out < 0:
            raise ValueError(f"cannot hold out {held_out} of {len(self)} trajectories")
        return self._rows(slice(0, m)), self._rows(slice(m, len(self)))

    def _rows(self, rows) -> Trajectories:
        calls = [{k: v[rows] if is_per_row(v, len(self)) else v for k, v in c.items()} for c in self.calls]
        return Trajectories(self.states[:, rows], self.sigmas, calls, dict(self.record))

    def batch(self, rows: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The one-shot call's keyword arguments and targets for trajectories ``rows``: the S steps stacked along
        the batch, step-major, each step's latents the teacher's (teacher forcing)."""
        kwargs: dict = {}
        for key in self.calls[0]:
            values = [c[key] for c in self.calls]
            if is_per_row(values[0], len(self)):
                kwargs[key] = torch.cat([v[rows] for v in values])
            else:
                kwargs[key] = values[0]
        x = self.states[:, rows]
        dt = (self.sigmas[1:] - self.sigmas[:-1]).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        targets = (x[1:] - x[:-1]) / dt  # (S, B, ...): one Euler step from x_s lands on x_{s+1}
        kwargs[self.record.get("latents_key", "hidden_states")] = x[:-1].reshape(-1, *x.shape[2:])
        return kwargs, targets.reshape(-1, *x.shape[2:])

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"states": self.states.contiguous(), "sigmas": self.sigmas}
        constants = []
        for s, call in enumerate(self.calls):
            consts = {}
            for k, v in call.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"calls.{s}.{k}"] = v.contiguous()
                else:
                    consts[k] = v
            constants.append(consts)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"record": json.dumps(self.record),
                                                 "constants": json.dumps(constants)})
        return path

    @classmethod
    def load(cls, path) -> Trajectories:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "states" not in tensors or "constants" not in meta:
            raise ValueError(f"{path}: not a trajectories file written by ditfx.history.Trajectories.save")
        calls = [dict(c) for c in json.loads(meta["constants"])]
        for k, v in tensors.items():
            if k.startswith("calls."):
                _, s, key = k.split(".", 2)
                calls[int(s)][key] = v
        return cls(tensors["states"], tensors["sigmas"], calls, json.loads(meta.get("record", "{}")))


def student_points(scheduler, teacher_steps: int, steps: int) -> tuple[list[int], list[float]]:
    """The teacher steps ``floor(s * T / S)`` the student's S steps start at, and their noise levels."""
    name = type(scheduler).__name__
    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"ditfx.history: the student's targets are flow-matching Euler steps; the pipeline's "
                         f"scheduler is {name} (use one of {FLOW_SCHEDULERS})")
    if not 1 <= steps <= teacher_steps:
        raise ValueError(f"steps must be in [1, teacher_steps={teacher_steps}], got {steps}")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(teacher_steps)
    indices = [s * teacher_steps // steps for s in range(steps)]
    return indices, [float(scheduler.sigmas[i]) for i in indices]


def _hidden(args: tuple, kwargs: dict) -> tuple[str, torch.Tensor]:
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    raise ValueError("ditfx.history: the denoiser must be called with hidden_states=... (as diffusers' pipelines "
                     "call their transformer)")


@torch.no_grad()
def record_trajectories(pipe, run: Callable, generations: int, steps: int = 4, teacher_steps: int = 50,
                        guidance_scale: float = 1.5, seed: int = 0, points: str = "denoised",
                        progress: bool = True) -> Trajectories:
    """Teacher trajectories of ``pipe`` at a student's ``steps`` points (module docstring, step 1).

    ``run(pipe, index, **call)`` runs generation ``index`` (the same prompts or labels every time it is given the
    same index) with the pipeline keywords in ``call`` (num_inference_steps, guidance_scale, generator and
    either sigmas or callback_on_step_end). ``points``: what the student's intermediate points are (module
    docstring): ``"denoised"`` the teacher's clean estimates there, ``"noisy"`` its latents there."""
    if points not in POINTS:
        raise ValueError(f"points must be one of {POINTS}, got {points!r}")
    denoiser = pipe.transformer
    indices, sigmas = student_points(pipe.scheduler, teacher_steps, steps)
    calls: list[list[dict]] = [[] for _ in range(steps)]
    states: list[list[torch.Tensor]] = [[] for _ in range(steps + 1)]
    latents_key = None
    start = time.time()
    for g in range(generations):
        seen: list[tuple] = []
        handle = denoiser.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append((a, k)), with_kwargs=True)
        try:
            run(pipe, g, num_inference_steps=steps, sigmas=sigmas, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed + g))
        finally:
            handle.remove()
        if len(seen) != steps:
            raise RuntimeError(f"ditfx.history: the student run of generation {g} called the denoiser {len(seen)} "
                               f"times for {steps} steps: `run` must pass its keywords to the pipeline, which "
                               "must call the denoiser once per step without guidance")
        latents_key, x_t = _hidden(*seen[0])
        rows = x_t.shape[0]
        for s, (_, k) in enumerate(seen):
            calls[s].append({key: v.detach().clone() if isinstance(v, torch.Tensor) else v
                             for key, v in k.items() if key != latents_key})
        trajectory: dict[int, torch.Tensor] = {}

        def keep(p, i, t, kw, trajectory=trajectory):
            trajectory[i + 1] = kw["latents"].detach().clone()
            return kw

        first: list = []
        handle = denoiser.register_forward_pre_hook(
            lambda m, a, k, first=first: first.append(_hidden(a, k)[1]) if not first else None, with_kwargs=True)
        try:
            run(pipe, g, num_inference_steps=teacher_steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed + g), callback_on_step_end=keep)
        finally:
            handle.remove()
        if len(trajectory) != teacher_steps or not first:
            raise RuntimeError(f"ditfx.history: the teacher run of generation {g} made {len(trajectory)} steps for "
                               f"{teacher_steps}: `run` must pass callback_on_step_end to the pipeline")
        if not torch.equal(first[0][:rows], x_t):
            raise RuntimeError("ditfx.history: the teacher and the student runs started from different noise: "
                               "`run` must pass the generator it is given to the pipeline")
        if trajectory[teacher_steps].shape != x_t.shape:
            raise ValueError(f"ditfx.history: the pipeline's latents {tuple(trajectory[teacher_steps].shape)} are not "
                             f"the denoiser's input {tuple(x_t.shape)}")
        trajectory[0] = x_t.detach().clone()
        states[0].append(trajectory[0])
        for s, i in enumerate(indices[1:], 1):
            states[s].append(trajectory[i] if points == "noisy" else _denoised(trajectory, i, pipe.scheduler.sigmas))
        states[steps].append(trajectory[teacher_steps])
        if progress:
            done = g + 1
            eta = (time.time() - start) / done * (generations - done)
            print(f"trajectories {done}/{generations} ({time.time() - start:.0f} s, ~{eta:.0f} s left)", flush=True)
    merged = []
    for s in range(steps):
        step_calls = calls[s]
        merged.append({key: torch.cat([c[key] for c in step_calls]) if is_per_row(step_calls[0][key], rows)
                       else _constant(key, [c[key] for c in step_calls]) for key in step_calls[0]})
    record = {"latents_key": latents_key, "points": points, "teacher_steps": teacher_steps,
              "guidance_scale": guidance_scale, "teacher_indices": indices, "generations": generations, "seed": seed,
              "seconds": round(time.time() - start, 1)}
    return Trajectories(torch.stack([torch.cat(x) for x in states]), torch.tensor([*sigmas, 0.0]), merged, record)


def _denoised(trajectory: dict[int, torch.Tensor], i: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The teacher's clean estimate at its step ``i``: ``x_i - sigma_i * v_i``, with v_i its guided velocity there,
    read off the Euler step it took, ``(x_{i+1} - x_i) / (sigma_{i+1} - sigma_i)``."""
    x, after = trajectory[i], trajectory[i + 1]
    sigma, following = float(sigmas[i]), float(sigmas[i + 1])
    return x - sigma * (after - x) / (following - sigma)


def _constant(key: str, values: list):
    first = values[0]
    if isinstance(first, torch.Tensor):  # the same tensor every generation (e.g. a 0-d timestep)
        if any(not torch.equal(v, first) for v in values):
            raise ValueError(f"ditfx.history: the denoiser's {key!r} is neither per-sample nor the same every "
                             "generation")
        return first
    if any(v != first for v in values):
        raise ValueError(f"ditfx.history: the denoiser's {key!r} changes between generations")
    return first


def distill(model: torch.nn.Module, trajectories: Trajectories, layers: int, minutes: float | None = 20.0,
            steps: int | None = None, batch: int = 32, lr: float = 3e-4, held_out: int = 64, heads: bool = True,
            seed: int = 0, log_every: int = 25, progress: bool = True) -> HistoryStudent:
    """Train a student of ``model`` on ``trajectories`` (module docstring, step 2): history attention in the lower
    ``layers`` blocks (0: step distillation), for ``minutes`` of wall time or ``steps`` optimiser steps, AdamW with
    a cosine decay (over ``steps``, or over the steps the first minute predicts for ``minutes``), gradient norm
    clipped at 1. ``held_out`` trajectories are kept out of training and give the held-out loss."""
    if (minutes is None) == (steps is None):
        raise ValueError("give exactly one of minutes= and steps=")
    train, test = trajectories.split(held_out)
    S = trajectories.steps
    student = copy.deepcopy(model).float().train().requires_grad_(True)
    step_heads = _teacher_heads(student, trajectories) if heads else None
    params = list(student.parameters())
    if step_heads is not None:
        step_heads = {k: torch.nn.Parameter(v) for k, v in step_heads.items()}
        params += list(step_heads.values())
    forward = one_shot(student, S, layers, step_heads)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(data: Trajectories, rows: torch.Tensor) -> torch.Tensor:
        kwargs, targets = data.batch(rows)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never the plain forward in its place
            out = first_tensor(forward(**kwargs))
        if out.shape != targets.shape:
            raise ValueError(f"ditfx.history: the denoiser's output {tuple(out.shape)} is not its latents' shape "
                             f"{tuple(targets.shape)}")
        return torch.nn.functional.mse_loss(out, targets)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(sum(loss_of(test, r) * len(r) for r in torch.arange(len(test)).split(batch)) / len(test))

    curve, held = [], [(0, held_out_loss())]
    start, total, k = time.time(), steps, 0
    while True:
        if total is None and time.time() - start > min(60.0, 60 * minutes) and k:
            total = max(k + 1, int(k * 60 * minutes / (time.time() - start)))
        if (steps is not None and k >= steps) or (steps is None and time.time() - start >= 60 * minutes):
            break
        frac = k / total if total else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        rows = torch.randint(len(train), (batch,), generator=gen)
        loss = loss_of(train, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        k += 1
        if k % log_every == 0:
            if k % (log_every * 8) == 0:
                held.append((k, held_out_loss()))
            if progress:
                print(f"step {k}: loss {sum(curve[-log_every:]) / log_every:.5f}, held-out {held[-1][1]:.5f} "
                      f"({time.time() - start:.0f} s)", flush=True)
    held.append((k, held_out_loss()))
    student.eval().requires_grad_(False)
    record = {"layers": layers, "steps": k, "seconds": round(time.time() - start, 1), "batch": batch, "lr": lr,
              "loss_curve": curve, "held_out_curve": held, "held_out_loss": held[-1][1],
              "held_out_loss_teacher_init": held[0][1], "trajectories": len(train), "held_out": len(test),
              "teacher": {k: v for k, v in trajectories.record.items() if k != "latents_key"}}
    out_heads = None if step_heads is None else {k: v.detach().clone() for k, v in step_heads.items()}
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return HistoryStudent(state, layers, S, trajectories.sigmas[:-1].tolist(), out_heads, record,
                          type(model).__name__)


def _teacher_heads(model: torch.nn.Module, trajectories: Trajectories) -> dict:
    """S copies of the teacher's de-embedding (weight (S, out, in), bias (S, out)), found in its captured graph."""
    found: dict = {}

    def backend(gm, example_inputs):
        keep_dynamo_compiling()
        sites = find_sites(gm, analyse(gm).roles, example_inputs)
        node = next(n for n in gm.graph.nodes if n.name == sites.deembed)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        weight, bias = (example_inputs[placeholders.index(a)] if a in placeholders else None for a in node.args[1:3])
        found["ids"] = (id(weight), id(bias))
        return gm.forward

    kwargs, _ = trajectories.batch(torch.arange(1))
    kwargs = {k: v[:1] if is_per_row(v, trajectories.steps) else v for k, v in kwargs.items()}
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    by_id = {id(p): p for p in model.parameters()}
    weight, bias = (by_id.get(i) for i in found.get("ids", (None, None)))
    if weight is None or bias is None:
        raise ValueError("ditfx.history: the de-embedding's weight and bias are not parameters of the model; "
                         "distill with heads=False")
    S = trajectories.steps
    return {"weight": weight.detach().clone().expand(S, *weight.shape).contiguous(),
            "bias": bias.detach().clone().expand(S, *bias.shape).contiguous()}
