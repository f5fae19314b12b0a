"""Load a script of benchmarks/ as a module, as running it would: with benchmarks/ on the import path (the
scripts import reporting.py and each other from beside them) and registered under its name (dataclasses and
Dynamo look a function's module up by name)."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(script: str) -> ModuleType:
    name = f"bench_{script}"
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("peers")``: benchmarks/peers.py as a module."""
    return _load
