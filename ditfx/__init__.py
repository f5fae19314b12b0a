"""ditfx: compiler passes that make Diffusion Transformer inference fast.

    fast = ditfx.optimize(model, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1)))
    # or: torch.compile(model, backend="ditfx", options={"cache": {"kind": "dynamic", "threshold": 0.1}})
"""
from ditfx.api import calibrate, generation, optimize, repeated_blocks, reset_stats, stats
from ditfx.backend import ditfx_backend
from ditfx.config import CacheCalibration, Config, DynamicCache, StaticCache
from ditfx.graph.structure import StructureError
from ditfx.runtime.schedule import CacheSchedule
from ditfx.runtime.session import Stats

__version__ = "0.1.0"

__all__ = [
    "CacheCalibration", "CacheSchedule", "Config", "DynamicCache", "StaticCache", "Stats", "StructureError",
    "calibrate", "ditfx_backend", "generation", "optimize", "repeated_blocks", "reset_stats", "stats",
]
