"""The generation lifecycle: which generation, step and branch a denoiser call belongs to.

Where the caller states it, it is known, not guessed:

* a diffusers pipeline resets its denoiser's stateful hooks at the end of every ``__call__``
  (``maybe_free_model_hooks`` -> ``_reset_stateful_cache``) and names its calls with
  ``transformer.cache_context("cond" | "uncond" | "cond_uncond")``: ditfx registers one stateful hook in the
  denoiser's diffusers hook registry (:mod:`ditfx.runtime.diffusers_hook`), so a generation ends when the
  pipeline says so and a call's branch is its context name;
* a diffusers pipeline's scheduler counts its steps (``scheduler.step_index`` is None until the first
  ``scheduler.step`` of a generation, which ``set_timesteps`` starts): where it has that count, a call's step is
  the scheduler's, and a generation starts when the count is back at None, or when ``scheduler.timesteps`` is a
  new tensor (every pipeline call starts with ``set_timesteps``, however the previous call ended: an exception in
  ``callback_on_step_end`` at step 0 leaves the count where a new call starts it). A scheduler whose count has
  reached its end drives no call (another pipeline built around the same model runs it, with its own scheduler):
  its calls are placed as below;
* ``with ditfx.generation(model):`` marks one generation in a hand-written loop.

The timestep is the fallback: samplers call the denoiser with non-increasing timesteps, so without stated
boundaries a new generation starts when it goes up (inside ``ditfx.generation()`` a rising timestep is the
sampler's own: some run time upward). A call at the same timestep as the previous one is another branch of the same step
when its latents are the previous call's (two-call classifier-free guidance), and a new step otherwise (a
second-order sampler such as Heun evaluates twice at every timestep after the first; new latents at the
generation's first timestep start the next generation). Where the fallback has to guess it warns: a repeat with
new latents past the first step (taken as a second-order step), and calls with no timestep ditfx can read (each
taken as a generation of its own, never reusing state).

All of it is per thread: two threads driving one optimized model run two independent generations.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CallInfo:
    """Where one denoiser call stands."""

    generation: int  # 0-based, per thread
    step: int  # 0-based within the generation
    branch: str | int  # the pipeline's context name, else the call's index within its step
    index: int  # the call's index within its step
    timestep: float | None
    new_generation: bool
    stated: bool  # generation boundaries come from the caller (pipeline or ditfx.generation()), not inferred
    steps: int | None = None  # the generation's step count, where the pipeline's scheduler states it


@dataclass
class _ThreadLifecycle:
    generation: int = -1
    step: int = -1
    index: int = 0
    branches: list = field(default_factory=list)  # branch names seen at this step
    last_timestep: float | None = None
    last_scheduler_step: int | None = None
    timesteps: Callable[[], object] | None = None  # the scheduler's timesteps at the last call (a weak reference)
    last_latents: torch.Tensor | None = None
    context: str | None = None  # the pipeline's cache_context name for the call in progress
    ended: bool = True  # the next call starts a generation
    explicit: int = 0  # depth of ditfx.generation() blocks
    rising: int = 0  # generations in a row that ended after one step because the timestep rose
    noted: float | None = None  # the timestep a graph piece before the blocks' graph saw in this call


class Lifecycle:
    """One per optimized model; the state of each thread is its own."""

    def __init__(self, on_end: Callable[[], None] | None = None):
        self._local = threading.local()
        self.on_end = on_end  # frees the thread's state when its generation is over
        self.pipeline_signals = False  # a diffusers hook reports generation ends and branch names
        self.scheduler_of = None  # () -> the pipeline's scheduler, where it counts its steps
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @property
    def _t(self) -> _ThreadLifecycle:
        t = getattr(self._local, "state", None)
        if t is None:
            t = self._local.state = _ThreadLifecycle()
        return t

    # ------------------------------------------------------------------------------------ signals
    def end_generation(self) -> None:
        """The current thread's generation is over (the pipeline says so): its state is freed now, and the next
        call starts a new generation."""
        t = self._t
        t.ended, t.last_latents = True, None
        if self.on_end is not None:
            self.on_end()

    def enter_generation(self) -> None:
        self._t.explicit += 1
        self.end_generation()

    def exit_generation(self) -> None:
        t = self._t
        t.explicit = max(0, t.explicit - 1)
        self.end_generation()

    def set_context(self, name: str | None) -> None:
        self._t.context = name

    def note_timestep(self, timestep) -> None:
        """The model's timestep as a piece of the model that runs before the blocks' graph saw it (a graph break
        cut the blocks' graph off from the timestep): the next call placed takes it for its own."""
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            self._t.noted = float(timestep.reshape(-1)[0])
        elif isinstance(timestep, (int, float)):
            self._t.noted = float(timestep)

    def _scheduler(self):
        scheduler = self.scheduler_of() if self.scheduler_of is not None else None
        return scheduler if scheduler is not None and hasattr(scheduler, "step_index") else None

    def _driving_scheduler(self, t: _ThreadLifecycle):
        """The pipeline's scheduler where it drives this call; marks a new pipeline call (``set_timesteps`` ran
        since the last call) as the start of a generation."""
        scheduler = self._scheduler()
        if scheduler is None:
            return None
        timesteps = getattr(scheduler, "timesteps", None)
        if t.timesteps is None or t.timesteps() is not timesteps:
            if t.timesteps is not None:
                t.ended = True  # a new pipeline call, whatever became of the previous one
            t.timesteps = _weak(timesteps)
        index = scheduler.step_index
        if index is not None and timesteps is not None and index >= len(timesteps):
            return None  # finished: another pipeline (its own scheduler) drives this model now
        return scheduler

    # ------------------------------------------------------------------------------------- placing
    def observe(self, timestep: float | None, latents: torch.Tensor | None) -> CallInfo:
        t = self._t
        noted, t.noted = t.noted, None  # a note serves the call it was made in, never a later one
        if timestep is None:
            timestep = noted
        name = t.context
        scheduler = self._driving_scheduler(t)
        index = scheduler.step_index if scheduler is not None else None
        counted = scheduler is not None and not (  # a loop the pipeline's scheduler does not drive
            index == t.last_scheduler_step and not t.ended and timestep is not None
            and t.last_timestep is not None and timestep != t.last_timestep)
        if counted:
            return self._place_by_scheduler(t, scheduler, index, name, timestep, latents)
        stated = self.pipeline_signals or t.explicit > 0
        new = t.ended
        if (not new and not t.explicit and timestep is not None and t.last_timestep is not None
                and timestep > t.last_timestep):
            new = True  # a sampler never goes back up: an interrupted or new generation
            t.rising = t.rising + 1 if t.step == 0 else 0
            if t.rising >= 3:
                self._warn("rising", "ditfx: the timestep rises at every call, so every call starts a new generation "
                           "(exact, without savings); if this sampler's time runs upward, mark each generation with "
                           "`with ditfx.generation(model):`")
        if not new and timestep is None and not stated:
            self._warn("no-timestep",
                       "ditfx: this model's calls carry no timestep that ditfx can read (a timestep passed as a "
                       "Python number is baked into the graph by Dynamo); generation boundaries are unknown, so "
                       "each call is taken as a new generation (exact, without savings). Pass the timestep as a "
                       "tensor, or mark each generation with `with ditfx.generation(model):`")
            new = True
        same_step = False
        if not new and timestep is not None and timestep == t.last_timestep:
            same_step, new = self._place_repeat(t, name, latents, stated)
        elif not new and timestep is None:
            same_step = name is not None and name not in t.branches
        if new:
            t.generation += 1
            t.step, t.index, t.branches = 0, 0, []
        elif same_step:
            t.index += 1
        else:
            t.step += 1
            t.index, t.branches = 0, []
        t.branches.append(name)
        t.ended = False
        t.last_timestep, t.last_latents, t.last_scheduler_step = timestep, latents, index
        return CallInfo(t.generation, t.step, name if name is not None else t.index, t.index, timestep, new,
                        stated)

    def _place_by_scheduler(self, t: _ThreadLifecycle, scheduler, index: int | None, name: str | None,
                            timestep: float | None, latents) -> CallInfo:
        """The scheduler's step count places the call: None before the first step of a generation."""
        new = t.ended or (index is None and t.last_scheduler_step is not None) or (
            index is not None and t.last_scheduler_step is not None and index < t.last_scheduler_step)
        if new:
            t.generation += 1
            t.step, t.index, t.branches = 0, 0, []
        elif index == t.last_scheduler_step and (name is None or name not in t.branches):
            t.index += 1
        else:
            t.step += 1
            t.index, t.branches = 0, []
        t.branches.append(name)
        t.ended, t.last_timestep, t.last_latents, t.last_scheduler_step = False, timestep, latents, index
        steps = getattr(scheduler, "timesteps", None)
        return CallInfo(t.generation, t.step, name if name is not None else t.index, t.index, timestep, new, True,
                        len(steps) if steps is not None else None)

    def _place_repeat(self, t: _ThreadLifecycle, name: str | None, latents, stated: bool) -> tuple[bool, bool]:
        """(same step, new generation) for a call at the previous call's timestep."""
        if name is not None:
            return name not in t.branches, False  # a branch name seen twice: the next step
        if latents is not None and t.last_latents is not None and latents.shape != t.last_latents.shape:
            return False, True  # another batch: another generation
        equal = (latents is not None and t.last_latents is not None and latents.shape == t.last_latents.shape
                 and bool(torch.equal(latents, t.last_latents)))
        if equal:
            return True, False  # the other branch of two-call guidance
        if stated:
            return False, False  # a second-order sampler's second evaluation at this timestep
        if t.step == 0:  # new latents at the generation's first timestep: the next (one-step) generation
            return False, True
        # Heun-type samplers evaluate twice at every timestep after the first (the step's correction, then the next
        # step's first evaluation); a new generation would start back at the first timestep, or above it
        self._warn("repeat",
                   "ditfx: two calls at the same timestep with different latents and no stated generation "
                   "boundaries: ditfx takes the second for a second-order sampler's evaluation (Heun-type) in the same "
                   "generation. If it starts a new generation instead, mark generations with "
                   "`with ditfx.generation(model):` (or use a diffusers pipeline)")
        return False, False

    def _warn(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, stacklevel=4)


def _weak(obj) -> Callable[[], object]:
    """A weak reference to ``obj`` where it takes one (tensors do), else a strong one: compared by identity."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj
