"""Step tracking: which step of which generation a denoiser call belongs to.

Samplers call the denoiser with decreasing timesteps, so a new generation starts when the timestep goes back
up (or on the first call, or when ``ditfx.generation()`` says so). A repeated timestep is another call of the
same step (the conditional and unconditional passes of unbatched CFG): it gets the next branch number, and
state is kept per branch so the two never mix. Once a step has completed, the number of calls per step is
known, and a repeated timestep beyond it starts a new generation. A generation that starts at the timestep
the previous one started at, before any step completed, is ambiguous: mark it with ``ditfx.generation()``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    generation: int  # 0-based
    step: int  # 0-based within the generation
    branch: int  # call number within the step
    timestep: float | None
    new_generation: bool


class StepTracker:
    def __init__(self):
        self.generation = -1
        self.step = -1
        self.branch = 0
        self.last_timestep: float | None = None
        self.calls_per_step: int | None = None  # learnt when the first step of a generation completes
        self._force_new = True

    def start_generation(self) -> None:
        """The next call starts a new generation, whatever its timestep."""
        self._force_new = True

    def observe(self, timestep: float | None) -> StepInfo:
        last = self.last_timestep
        repeat = timestep is not None and timestep == last
        new = (self._force_new or (timestep is not None and last is not None and timestep > last)
               or (repeat and self.calls_per_step is not None and self.branch + 1 >= self.calls_per_step))
        if new:
            self.generation += 1
            self.step, self.branch = 0, 0
        elif timestep is not None and timestep == last:
            self.branch += 1
        else:
            if self.step == 0:
                self.calls_per_step = self.branch + 1
            self.step += 1
            self.branch = 0
        self._force_new = False
        self.last_timestep = timestep
        return StepInfo(self.generation, self.step, self.branch, timestep, new)
