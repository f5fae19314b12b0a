"""ditfx: compiler passes that make Diffusion Transformer inference fast.

    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    # or: torch.compile(model, backend="ditfx", options={"cache": {"kind": "dynamic", "threshold": 0.1}})

``import ditfx`` stays cheap: it imports neither Dynamo nor Inductor (nor Triton). The names that need them (the
api functions, the backend, ``ditfx.budget``, ``export``, ``load``) are imported on first access (PEP 562).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ditfx.config import (AdaptiveGuidance, CacheCalibration, Config, DynamicCache, GuidanceWindow, LinearAG,
                          HistoryAttention, StaticCache, TokenBudget)
from ditfx.runtime.linear_ag import LinearAGCoefficients
from ditfx.graph.structure import StructureError
from ditfx.runtime.schedule import CacheSchedule
from ditfx.runtime.session import Stats

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from ditfx import budget
    from ditfx.api import (calibrate, calibrate_guidance, generation, guidance_trace, optimize, repeated_blocks,
                           reset_stats, stats)
    from ditfx.backend import ditfx_backend
    from ditfx.package.build import export
    from ditfx.package.loaded import load
    from ditfx.tuning.budget import QualityBudget
    from ditfx.tuning.study import tune

__version__ = "0.1.0"

# name -> (module, attribute in it, or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    **{name: ("ditfx.api", name) for name in ("calibrate", "calibrate_guidance", "generation", "guidance_trace",
                                              "optimize", "repeated_blocks", "reset_stats", "stats")},
    "ditfx_backend": ("ditfx.backend", "ditfx_backend"),
    "budget": ("ditfx.budget", None),
    "export": ("ditfx.package.build", "export"),
    "load": ("ditfx.package.loaded", "load"),
    "tune": ("ditfx.tuning.study", "tune"),
    "QualityBudget": ("ditfx.tuning.budget", "QualityBudget"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
    elif not name.startswith("_") and importlib.util.find_spec(f"ditfx.{name}") is not None:
        module_name, attribute = f"ditfx.{name}", None  # a submodule, as ``ditfx.api`` was after ``import ditfx``
    else:
        raise AttributeError(f"module 'ditfx' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdaptiveGuidance", "CacheCalibration", "CacheSchedule", "Config", "DynamicCache", "GuidanceWindow", "LinearAG",
    "HistoryAttention", "LinearAGCoefficients", "QualityBudget", "StaticCache", "Stats", "StructureError", "TokenBudget", "budget",
    "calibrate", "calibrate_guidance", "ditfx_backend", "export", "generation", "guidance_trace", "load",
    "optimize", "repeated_blocks", "reset_stats", "stats", "tune",
]
