"""Names a package hands on without importing them first (PEP 562): the facade's api, a technique's training."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, table: dict[str, tuple[str, str | None]]
               ) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps a name to (module, attribute in it, or None
    for the module itself), imported on first access and kept in the package after."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attribute = table[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        setattr(sys.modules[package], name, value)  # later accesses skip __getattr__
        return value

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
