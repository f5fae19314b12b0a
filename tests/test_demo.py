"""`ditfx demo` at a tiny size: the PNG, the table, the JSON, and clear errors for bad settings."""
import json

import pytest
from PIL import Image

from ditfx import cli
from ditfx.demo import DemoSettings, format_table, run_demo


@pytest.mark.slow  # the demo end to end
def test_demo_writes_both_grids_and_the_table(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--per-class", "2", "--steps", "4", "--compiler", "aot_eager", "--out", str(out),
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    base, fast, student = result["rows"]
    assert base["nfe"] == 8 and base["block_evals"] == 6 * 4 and base["speedup"] == 1.0
    assert fast["steps"] == 4 and 4 <= fast["nfe"] <= 8 and fast["block_evals"] <= base["block_evals"]
    assert 0 < fast["flops"] <= base["flops"] and fast["psnr"] > 0 and 0 <= fast["accuracy"] <= 1
    assert student["method"] == "ditfx ard student" and student["nfe"] == 4 and student["block_evals"] == 6 * 4
    assert 0 < student["flops"] < base["flops"] and student["psnr"] > 0
    image = Image.open(out)
    assert image.width > 2 * 2 * 16 and image.height > 10 * 16  # two grids of 10 rows, upscaled
    assert "speed-up" in format_table(result)


@pytest.mark.parametrize("field, value, message", [
    ("per_class", 1, "per_class must be >= 2"),
    ("steps", 1, "steps must be >= 2"),
    ("out", "grid.jpg", "must be a .png"),
    ("compiler", "tvm", "unknown inner backend"),
    ("student", "lcm", "student must be 'ard', 'step' or None"),
])
def test_bad_settings_fail_before_sampling(field, value, message):
    with pytest.raises(ValueError, match=message):
        run_demo(DemoSettings(**{field: value}))
