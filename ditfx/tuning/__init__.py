"""Calibration to a quality target: :func:`ditfx.tune` finds the fastest configuration inside a
:class:`ditfx.QualityBudget`.

    budget = ditfx.QualityBudget(psnr=30)
    config = ditfx.tune(pipe, run, budget, calibration=[0, 1], held_out=[100], out="tuned.json")
    ditfx.Config.load("tuned.json")

Spaces (what is searched) are built with :func:`techniques` or from :class:`Knob` and :class:`Space`. See
docs/tune.md.
"""
from ditfx.tuning.quality import QualityBudget
from ditfx.tuning.space import Knob, Space, techniques
from ditfx.tuning.study import default_space, tune

__all__ = ["Knob", "QualityBudget", "Space", "default_space", "techniques", "tune"]
