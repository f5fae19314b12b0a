"""Every script of benchmarks/ runs: none shadows an installed package or a stdlib module, and each command line
answers ``--help`` in a fresh process, run the way the docs run them (``cd benchmarks && python SCRIPT.py``)."""

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ditfx

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
MAIN = re.compile(r"""^if __name__ == ["']__main__["']\s*:""", re.MULTILINE)
HELP_TIMEOUT_S = 180


def _inside_benchmarks(spec: importlib.machinery.ModuleSpec) -> bool:
    places = [spec.origin] if spec.origin not in (None, "built-in", "frozen") else []
    places += list(spec.submodule_search_locations or [])
    return bool(places) and all(Path(p).resolve().is_relative_to(BENCHMARKS) for p in places)


def _installed_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """Where ``import name`` goes when benchmarks/ is not on the path: ``importlib.util.find_spec``, and, past a
    script a test loaded (``reporting`` sits in sys.modules once a benchmark imported it), every finder of
    ``sys.meta_path`` with benchmarks/ left off the path."""
    rest = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
    searches = [lambda: importlib.util.find_spec(name)]
    searches += [lambda f=finder: f.find_spec(name, rest if f is importlib.machinery.PathFinder else None)
                 for finder in sys.meta_path if hasattr(finder, "find_spec")]
    found = []
    for search in searches:
        try:
            found.append(search())
        except (ImportError, ValueError, AttributeError):  # a module in sys.modules without a __spec__, ...
            continue
    return next((spec for spec in found if spec is not None and not _inside_benchmarks(spec)), None)


def _shadowed(name: str) -> str | None:
    """What a module of benchmarks/ called ``name`` would hide, or None."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return f"the standard library module {name!r}"
    spec = _installed_spec(name)
    distributions = importlib.metadata.packages_distributions().get(name)
    if spec is None and not distributions:
        return None
    where = f" at {spec.origin or list(spec.submodule_search_locations or [])}" if spec is not None else ""
    by = f" (installed by {', '.join(sorted(set(distributions)))})" if distributions else ""
    return f"the installed package {name!r}{where}{by}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_benchmark_shadows_an_installed_package(script):
    shadowed = _shadowed(script.stem)
    assert shadowed is None, (
        f"benchmarks/{script.name} shadows {shadowed}: `cd benchmarks && python SCRIPT.py` puts benchmarks/ first "
        f"on sys.path, so every `import {script.stem}` in that process (torch, transformers, diffusers, ...) gets "
        f"this script instead. Rename the script to a name no installed package or stdlib module uses "
        f"(git mv benchmarks/{script.name} benchmarks/<new name>.py) and update what refers to it."
    )


def _command_lines() -> list[Path]:
    """The scripts with a command line; the rest (reporting.py) are libraries the scripts import."""
    return [p for p in SCRIPTS if MAIN.search(p.read_text())]


def _env() -> dict[str, str]:
    """This environment, PYTHONPATH kept; with this checkout in front when the tests import ditfx from it (as
    ``python -m pytest`` does from a checkout whose venv installs another one), so the scripts run the ditfx under
    test."""
    env = dict(os.environ)
    if Path(ditfx.__file__).resolve().parents[1] == REPO:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _help(script: Path, env: dict[str, str]) -> str | None:
    """None when ``python SCRIPT.py --help`` (in benchmarks/) prints a usage and exits 0, else what went wrong."""
    try:
        proc = subprocess.run([sys.executable, script.name, "--help"], cwd=BENCHMARKS, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"{script.name} --help: no answer in {HELP_TIMEOUT_S} s"
    if proc.returncode == 0 and "usage" in proc.stdout:
        return None
    return f"{script.name} --help: exit status {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"


@pytest.mark.slow  # a fresh process per script
def test_every_benchmark_answers_help_in_a_fresh_process():
    scripts = _command_lines()
    assert scripts, f"no script with a command line in {BENCHMARKS}"
    env = _env()
    with ThreadPoolExecutor(max_workers=2) as pool:  # each a process of its own; two at a time
        failures = [f for f in pool.map(lambda s: _help(s, env), scripts) if f is not None]
    assert not failures, "\n\n".join(failures)
