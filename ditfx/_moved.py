"""Modules that moved when each technique became one folder (2026-12): importing an old path still works, gives
the module's new home and warns once (a DeprecationWarning) where to import it from.

Only the paths users could have imported are kept: the facade (``ditfx.*``) and the technique packages were and
are the public surface; these are the module paths docs and code pointed at before.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

MOVED = {
    "ditfx.runtime.schedule": "ditfx.cache.schedule",
    "ditfx.runtime.relative_change": "ditfx.cache.change",
    "ditfx.runtime.block_cache": "ditfx.cache.policy",
    "ditfx.passes.block_cache": "ditfx.cache.variants",
    "ditfx.runtime.linear_ag": "ditfx.guidance.linear_ag",
    "ditfx.runtime.guidance": "ditfx.guidance.policy",
    "ditfx.passes.guidance": "ditfx.guidance.variants",
    "ditfx.runtime.budget": "ditfx.budget.policy",
    "ditfx.passes.budget": "ditfx.budget.variants",
    "ditfx.budget.retoken": "ditfx.graph.retoken",
    "ditfx.budget.gaps": "ditfx.budget.calibration",
    "ditfx.runtime.history": "ditfx.history.policy",
    "ditfx.passes.history": "ditfx.history.variants",
    "ditfx.passes.rebatch": "ditfx.graph.rebatch",
    "ditfx.passes.fusion": "ditfx.kernels.lowering.fusion",
    "ditfx.passes.cache_bookkeeping": "ditfx.kernels.lowering.cache_bookkeeping",
    "ditfx.passes.context": "ditfx.technique",
    "ditfx.runtime.session": "ditfx.runtime.stats",
    "ditfx.tuning.budget": "ditfx.tuning.quality",
    "ditfx.models.digits.budget": "ditfx.models.digits.token_budget",
}


class _Alias(types.ModuleType):
    """An old module path: every attribute is the new module's."""

    def __init__(self, name: str, target: types.ModuleType):
        super().__init__(name, target.__doc__)
        self._target = target

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def __dir__(self) -> list[str]:
        return dir(self._target)


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}: import it from there ({spec.name} will be removed)",
                      DeprecationWarning, stacklevel=2)
        return _Alias(spec.name, importlib.import_module(new))

    def exec_module(self, module: types.ModuleType) -> None:
        pass

    def get_code(self, fullname: str):
        """The new module's code (``python -m OLD`` runs it)."""
        new = MOVED[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader())
        return None


def install() -> None:
    """Let the old paths import (once per process)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
