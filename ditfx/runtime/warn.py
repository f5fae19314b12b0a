"""Warnings the runtime gives once each: a condition that holds for a whole generation (or a whole model) is
said once, not at every call."""
from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable


class WarnOnce:
    """``warn_once(key, message)`` warns the first time a key is seen, from any thread."""

    def __init__(self):
        self._given: set[Hashable] = set()
        self._lock = threading.Lock()

    def __call__(self, key: Hashable, message: str, stacklevel: int = 2) -> None:
        with self._lock:
            if key in self._given:
                return
            self._given.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)
