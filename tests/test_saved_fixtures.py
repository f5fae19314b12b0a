"""What users saved with an older ditfx still loads and gives the same results: configs (``Config.save``), plans
(``plan_io.save_plan``) and a package (``ditfx.export``) written by ditfx at commit 722ec36, before the technique
folders, with the outputs that ditfx gave (``tests/fixtures/saved_722ec36``, written by its ``make.py``)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditfx

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_722ec36"
sys.path.insert(0, str(SAVED))
import make  # noqa: E402  (the fixtures' own loop: the same calls as when they were written)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
EXPECTED = load_file(str(SAVED / "expected.safetensors"))


def close(got: torch.Tensor, name: str) -> float:
    return float((got - EXPECTED[name]).abs().max())


@pytest.mark.parametrize("name", ["static_adaptive", "dynamic_linear_ag", "window", "budget", "history"])
def test_a_saved_config_loads_and_gives_the_same_result(name):
    config = ditfx.Config.load(SAVED / "configs" / name / "config.json")
    _, family, batch = {"budget": (None, "dit", 4), "history": (None, "reference", 2)}.get(name, (None, "reference", 4))
    model, _ = make.tiny_model(family, batch=batch)
    got = make.run(ditfx.optimize(model, config), family, batch, guided=config.guidance is not None)
    assert close(got, f"config.{name}") <= 1e-5


@pytest.mark.parametrize("name", ["cache_guidance", "budget"])
def test_a_saved_plan_loads_and_gives_the_same_result(name):
    from ditfx.plan_io import load_plan
    from ditfx.runtime.compiler import RegionCompiler
    from ditfx.runtime.executor import Executor
    from ditfx.runtime.state import ModelRuntime

    directory = SAVED / "plans" / name
    plan = load_plan(directory)
    stored = load_file(str(directory / "inputs.safetensors"))
    family = "dit" if name == "budget" else "reference"
    _, kw = make.tiny_model(family, batch=2)
    got = []

    def capture(gm, example_inputs):  # the call's other inputs (constants Dynamo passes), as when saved
        got.append(list(example_inputs))
        return gm.forward

    with torch.no_grad():
        make.call(torch.compile(make.tiny_model(family, batch=2)[0], backend=capture, fullgraph=True,
                                dynamic=False), kw, family)
    inputs = [stored.get(str(i), v) for i, v in enumerate(got[0])]
    runtime = ModelRuntime()
    runtime.compiler = RegionCompiler("eager")
    with torch.no_grad():
        out = Executor(plan, runtime, inputs, compile_edges=False)(*inputs)
    assert close(out[0] if isinstance(out, (tuple, list)) else out, f"plan.{name}") <= 1e-6


def test_a_saved_package_loads_and_gives_the_same_result(tmp_path):
    from ditfx.package.manifest import PackageError

    try:
        loaded = ditfx.load(SAVED / "package")
    except PackageError as e:  # built for another CPU or torch: compiled again from its programs, as a user would
        if "was built" not in str(e):
            raise
        from ditfx.package.build import rebuild

        shutil.copytree(SAVED / "package", tmp_path / "saved")
        loaded = ditfx.load(rebuild(tmp_path / "saved", tmp_path / "rebuilt"))
    assert close(make.run(loaded, "reference", 4, guided=True), "package") <= 1e-5
