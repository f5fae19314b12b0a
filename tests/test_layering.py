"""The house: no import cycle anywhere in ditfx (imports inside functions and under TYPE_CHECKING counted), no
module of the package imports the ``ditfx`` facade, each technique is one folder holding its knobs, its pass and
its policy, registered by one field of Config, and the executor and the state store name no technique."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ditfx
from ditfx.config import Config

ROOT = Path(ditfx.__file__).resolve().parent
TECHNIQUES = ("cache", "guidance", "budget", "history")


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package's __init__)."""
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return out


def imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports, anywhere in its file: ``from a.b import c`` is a.b, and
    a.b.c too where c is a module; a relative import resolves against the package."""
    found = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        for target in targets:
            while target and target not in known:  # ditfx.x.Name -> ditfx.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, is_package, set(mods)) for name, (path, is_package) in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_ditfx():
    graph = import_graph()
    assert len(graph) > 100 and "ditfx.cache.policy" in graph["ditfx.cache"]  # lazy imports are in the graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_an_old_path():
    """The old module paths (``ditfx._moved``) are for users' code; the package imports where things are."""
    from ditfx._moved import MOVED

    used = []
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if (
                isinstance(node, ast.ImportFrom) and node.module) else []
            used += [(name, n) for n in names if n in MOVED]
    assert used == []


def test_no_module_of_the_package_imports_the_facade():
    graph = import_graph()
    assert sorted(name for name, deps in graph.items() if "ditfx" in deps and name != "ditfx") == []


def test_each_technique_is_one_folder_with_its_knobs_pass_and_policy_registered_by_one_config_field():
    registered = {t.name: t for t in Config.registered()}
    assert set(registered) == set(TECHNIQUES)
    for name in TECHNIQUES:
        folder = ROOT / name
        assert {"__init__.py", "config.py", "variants.py", "policy.py"} <= {f.name for f in folder.iterdir()}
        technique = registered[name]
        package = importlib.import_module(f"ditfx.{name}")
        assert package.TECHNIQUE is technique
        assert technique.offer.__module__ == f"ditfx.{name}.variants"
        assert all(c.__module__ == f"ditfx.{name}.config" for c in technique.configs + technique.internal)
        from ditfx.runtime.policy import policy_class

        for cls in technique.configs + technique.internal:  # each config runs as a policy of its folder
            assert policy_class(object.__new__(cls)).__module__ == f"ditfx.{name}.policy"
    fields = [f.name for f in Config.__dataclass_fields__.values() if "technique" in f.metadata]
    assert sorted(fields) == sorted(TECHNIQUES)
    # the passes folder holds the manager alone; the runtime folder no technique module
    assert {f.stem for f in (ROOT / "passes").glob("*.py")} == {"__init__", "manager"}
    assert not {f.stem for f in (ROOT / "runtime").glob("*.py")} & {"block_cache", "guidance", "budget", "history",
                                                                     "schedule", "linear_ag"}


WORDS = re.compile(r"cache|guidance|budget|history|token|adapter|epilogue|cfg|patch|lora|probe|student", re.I)


@pytest.mark.parametrize("module", ["runtime/executor.py", "runtime/state.py", "runtime/rows.py", "plan.py"])
def test_the_core_names_no_technique_in_code(module):
    """The executor, the state store, the row rule and the plan: no technique word in their code (their docs may
    give examples); the plan's ``tokens`` is a graph fact and stays."""
    tree = ast.parse((ROOT / module).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) for a in n.args.args}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and not (n.value.count("\n") or len(n.value) > 120)}  # docstrings aside
    allowed = {"tokens"} if module == "plan.py" else set()
    found = sorted(w for w in names | strings if WORDS.search(w) and w not in allowed)
    if module in ("runtime/executor.py", "runtime/state.py"):  # not even in their docs
        found += WORDS.findall((ROOT / module).read_text())
    assert found == []


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT.parent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]


def test_the_readme_layout_names_what_the_tree_holds():
    """Every top-level module and folder of the package is in the README's Layout section, and every path the
    section names exists."""
    readme = (ROOT.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    named = set(re.findall(r"ditfx/[\w/.]+", layout))
    for path in named:
        assert (ROOT.parent / path.rstrip("/")).exists(), f"the README's layout names {path}, which does not exist"
    tops = {f"ditfx/{p.name}{'/' if p.is_dir() else ''}" for p in ROOT.iterdir()
            if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    assert sorted(tops - {n if n.endswith("/") or n.endswith(".py") else n + "/" for n in named}) == []
