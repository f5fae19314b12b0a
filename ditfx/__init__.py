"""ditfx: compiler passes that make Diffusion Transformer inference fast.

    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    # or: torch.compile(model, backend="ditfx", options={"cache": {"kind": "dynamic", "threshold": 0.1}})

``import ditfx`` stays cheap: it imports neither Dynamo nor Inductor (nor Triton). The names that need them (the
api functions, the backend, ``export``, ``load``, ``tune``, the calibrations) are imported on first access
(PEP 562). Each technique is a package of its own (``ditfx.cache``, ``ditfx.guidance``, ``ditfx.budget``,
``ditfx.history``); no module of ditfx imports this facade.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ditfx import _moved
from ditfx._version import __version__ as __version__
from ditfx.budget.config import TokenBudget
from ditfx.cache.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.cache.schedule import CacheSchedule
from ditfx.config import Config
from ditfx.graph.structure import StructureError
from ditfx.guidance.config import AdaptiveGuidance, GuidanceWindow, LinearAG
from ditfx.guidance.linear_ag import LinearAGCoefficients
from ditfx.history.config import HistoryAttention
from ditfx.lazy import lazy_names
from ditfx.runtime.stats import Stats

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from ditfx import budget, cache, guidance, history
    from ditfx.api import generation, optimize, repeated_blocks, reset_stats, stats
    from ditfx.backend import ditfx_backend
    from ditfx.cache.calibration import calibrate
    from ditfx.guidance.calibration import calibrate_guidance, guidance_trace
    from ditfx.package.build import export
    from ditfx.package.loaded import load
    from ditfx.tuning.quality import QualityBudget
    from ditfx.tuning.study import tune

_moved.install()  # the module paths that moved to the technique folders still import (with a warning)

# name -> (module, attribute in it, or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    **{name: ("ditfx.api", name) for name in ("generation", "optimize", "repeated_blocks", "reset_stats", "stats")},
    "calibrate": ("ditfx.cache.calibration", "calibrate"),
    "calibrate_guidance": ("ditfx.guidance.calibration", "calibrate_guidance"),
    "guidance_trace": ("ditfx.guidance.calibration", "guidance_trace"),
    "ditfx_backend": ("ditfx.backend", "ditfx_backend"),
    "export": ("ditfx.package.build", "export"),
    "load": ("ditfx.package.loaded", "load"),
    "tune": ("ditfx.tuning.study", "tune"),
    "QualityBudget": ("ditfx.tuning.quality", "QualityBudget"),
    # the technique packages and the tools, as attributes (``ditfx.budget.distill``, ``ditfx.tuning.Space``)
    **{name: (f"ditfx.{name}", None) for name in ("api", "budget", "cache", "guidance", "history", "inspect",
                                                  "kernels", "models", "package", "tuning")},
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = [
    "AdaptiveGuidance", "CacheCalibration", "CacheSchedule", "Config", "DynamicCache", "GuidanceWindow",
    "HistoryAttention", "LinearAG", "LinearAGCoefficients", "QualityBudget", "StaticCache", "Stats",
    "StructureError", "TokenBudget", "budget", "cache", "calibrate", "calibrate_guidance", "ditfx_backend", "export",
    "generation", "guidance", "guidance_trace", "history", "load", "optimize", "repeated_blocks", "reset_stats",
    "stats", "tune",
]
