"""ditfx.kernels.codegen without running a kernel: printing, validation and the file cache."""

import pytest
import sympy
import torch

from ditfx.kernels import codegen
from ditfx.kernels.codegen import generate_elementwise, to_triton

x, y, scale, shift = sympy.symbols("x y scale shift")
MODULATE = x * (1 + scale) + shift
MODULATE_INPUTS = {"x": "full", "scale": "per_sample", "shift": "per_sample"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DITFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(codegen, "_LOADED", {})


def test_printer():
    assert to_triton(MODULATE) == "v_shift + v_x*(v_scale + 1.0)"
    assert to_triton(x**3) == "((v_x) * (v_x) * (v_x))"
    assert to_triton(1 / x**2) == "(1.0 / ((v_x) * (v_x)))"
    assert to_triton(sympy.sqrt(x)) == "tl.sqrt(v_x)"
    assert to_triton(1 / sympy.sqrt(x)) == "tl.rsqrt(v_x)"
    assert to_triton(sympy.exp(sympy.Abs(x))) == "tl.exp(tl.abs(v_x))"
    assert "tl.sigmoid" in to_triton(sympy.tanh(x))
    assert to_triton(x / 2) == "v_x/2.0"


@pytest.mark.parametrize("expr", [sympy.sin(x), x**y, x ** sympy.Rational(1, 3), sympy.I * x])
def test_printer_rejects_unsupported(expr):
    with pytest.raises(NotImplementedError):
        to_triton(expr)


def test_validation():
    with pytest.raises(ValueError, match="symbols"):
        generate_elementwise(MODULATE, {"x": "full", "scale": "per_sample"}, torch.float32)
    with pytest.raises(ValueError, match="kinds"):
        generate_elementwise(x + y, {"x": "full", "y": "rowwise"}, torch.float32)
    with pytest.raises(ValueError, match="full"):
        generate_elementwise(x + y, {"x": "per_sample", "y": "scalar"}, torch.float32)


def test_same_expression_and_dtypes_hit_the_file_cache(tmp_path, monkeypatch):
    launch = generate_elementwise(MODULATE, MODULATE_INPUTS, torch.bfloat16)
    (path,) = (tmp_path / "kernels").iterdir()
    stat = path.stat()
    assert launch.__module__.startswith("ditfx_generated_")
    assert "tl.store" in path.read_text() and "torch.bfloat16" in path.read_text()

    # Same call again, even in a "new process" (empty in-memory cache): the file is imported,
    # not regenerated.
    monkeypatch.setattr(codegen, "_LOADED", {})
    monkeypatch.setattr(codegen, "render", pytest.fail)
    again = generate_elementwise(MODULATE, MODULATE_INPUTS, torch.bfloat16)
    assert again.__globals__["__file__"] == str(path)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert generate_elementwise(MODULATE, MODULATE_INPUTS, torch.bfloat16) is again


def test_dtypes_and_kinds_are_part_of_the_key(tmp_path):
    generate_elementwise(MODULATE, MODULATE_INPUTS, torch.float32)
    generate_elementwise(MODULATE, MODULATE_INPUTS, torch.float16)
    generate_elementwise(MODULATE, {**MODULATE_INPUTS, "shift": "scalar"}, torch.float32)
    assert len(list((tmp_path / "kernels").glob("elementwise_*.py"))) == 3


def test_launcher_checks_shapes():
    launch = generate_elementwise(MODULATE, MODULATE_INPUTS, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        launch(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4))
