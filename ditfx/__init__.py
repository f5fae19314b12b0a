"""ditfx: compiler passes that make Diffusion Transformer inference fast.

    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    # or: torch.compile(model, backend="ditfx", options={"cache": {"kind": "dynamic", "threshold": 0.1}})
"""
from ditfx.api import (calibrate, calibrate_guidance, generation, guidance_trace, optimize, repeated_blocks,
                       reset_stats, stats)
from ditfx.backend import ditfx_backend
from ditfx import budget
from ditfx.config import (AdaptiveGuidance, CacheCalibration, Config, DynamicCache, GuidanceWindow, LinearAG,
                          HistoryAttention, StaticCache, TokenBudget)
from ditfx.runtime.linear_ag import LinearAGCoefficients
from ditfx.graph.structure import StructureError
from ditfx.runtime.schedule import CacheSchedule
from ditfx.runtime.session import Stats

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGuidance", "CacheCalibration", "CacheSchedule", "Config", "DynamicCache", "GuidanceWindow", "LinearAG",
    "HistoryAttention", "LinearAGCoefficients", "StaticCache", "Stats", "StructureError", "TokenBudget", "budget",
    "calibrate", "calibrate_guidance", "ditfx_backend", "generation", "guidance_trace", "optimize",
    "repeated_blocks", "reset_stats", "stats",
]
