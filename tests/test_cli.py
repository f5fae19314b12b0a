"""The ``ditfx calibrate`` and ``ditfx inspect`` commands on the tiny reference DiT."""
import json

import pytest

from ditfx import cli


def test_calibrate_then_inspect_the_plan_with_blocks_together(tmp_path, capsys):
    schedule = tmp_path / "schedule.json"
    assert cli.main(["calibrate", "DiT-T/2", "--steps", "6", "--generations", "1", "--delta", "3",
                     "--out", str(schedule)]) == 0
    assert schedule.is_file() and schedule.with_suffix(".png").is_file()
    assert "block evaluations" in capsys.readouterr().out
    assert cli.main(["inspect", "DiT-T/2", "--schedule", str(schedule), "--delta", "3",
                     "--steps", "6", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["per_block"] is False and plan["forecast"] == "linear"
    assert all(len(set(column)) == 1 for column in zip(*plan["compute"]))  # every block or none, per step
    assert 0 < plan["block_evals"] < plan["block_evals_uncached"]


def test_bad_schedule_path_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["inspect", "DiT-T/2", "--schedule", str(tmp_path / "missing.json")]) == 2
    assert "ditfx calibrate" in capsys.readouterr().err


def test_calibrate_writes_a_budget_schedule_and_inspect_shows_the_patch_per_step(tmp_path, capsys):
    from ditfx.cli import main

    out = tmp_path / "budget.json"
    assert main(["calibrate", "tiny:dit", "--budget", "--flops", "0.7", "--steps", "6", "--generations", "1",
                 "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert "weak steps at flops 0.7" in capsys.readouterr().out
    assert main(["inspect", "tiny:dit", "--budget-until", "0.5", "--steps", "6"]) == 0
    assert "patch per step: 4 4 4 n n n" in capsys.readouterr().out


@pytest.mark.slow  # AOTInductor builds
def test_export_writes_a_package_that_loads_and_refuses_bad_requests(tmp_path, capsys):
    """``ditfx export`` on the tiny reference DiT (positional call x, t, y): a package, its summary as JSON, the
    module ``ditfx.load`` makes of it runs the model's call, and ``ditfx rebuild`` compiles the same package again
    from its programs."""
    import torch

    import ditfx
    from ditfx.models import zoo

    path = tmp_path / "pkg"
    # no technique: the prologue, the block every block runs and the epilogue (the techniques' variants are
    # exported and rebuilt in tests/test_package.py and tests/test_saved_fixtures.py)
    assert cli.main(["export", "DiT-T/2", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["artifacts"] == 3 and summary["device"] == "cpu" and "cache=None" in summary["config"]
    assert "compiling 3 artifacts with AOTInductor" in captured.err
    named = zoo.load("DiT-T/2", batch=2)
    loaded = ditfx.load(path)
    with torch.no_grad():
        got, expected = loaded(*named.inputs.values()), named.model(**named.inputs)
    assert (got - expected).abs().max() <= 1e-5
    # compiled again from the exported programs alone (``ditfx rebuild``): the same package
    assert cli.main(["rebuild", str(path), str(tmp_path / "rebuilt")]) == 0
    assert sum(line.startswith("  compiled") for line in capsys.readouterr().err.splitlines()) == 3
    with torch.no_grad():
        assert torch.equal(ditfx.load(tmp_path / "rebuilt")(*named.inputs.values()), got)
    assert cli.main(["export", "DiT-T/2", str(path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["export", "DiT-T/2", str(tmp_path / "demo"), "--demo"]) == 2
    assert "--demo exports the digits model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["inspect", "DiT-T/2", "--delta", "0.3"], "--delta"),
    (["inspect", "DiT-T/2", "--per-block"], "--per-block"),
    (["inspect", "DiT-T/2", "--threshold", "0.2", "--per-block"], "--per-block"),
    (["inspect", "DiT-T/2", "--forecast", "linear"], "--forecast"),
    (["inspect", "DiT-T/2", "--threshold", "0.2", "--schedule", "s.json"], "--threshold"),
    (["inspect", "DiT-T/2", "--patch", "4"], "--patch"),
    (["inspect", "DiT-T/2", "--adapter", "digits"], "--adapter"),
    (["export", "DiT-T/2", "unused", "--delta", "0.3"], "--delta"),
    (["export", "DiT-T/2", "unused", "--fill", "cond"], "--fill"),
    (["export", "DiT-T/2", "unused", "--per-class", "2"], "--per-class"),
    (["export", "digits", "unused", "--demo", "--threshold", "0.2"], "--threshold"),
    (["export", "digits", "unused", "--demo", "--batch", "4"], "--batch"),
    (["calibrate", "DiT-T/2", "--flops", "0.5"], "--flops"),
    (["calibrate", "DiT-T/2", "--scale", "2"], "--scale"),
    (["calibrate", "DiT-T/2", "--budget", "--delta", "0.3"], "--delta"),
    (["calibrate", "DiT-T/2", "--budget", "--per-block"], "--per-block"),
])
def test_a_flag_that_would_do_nothing_is_an_error(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
    assert not (tmp_path / "unused").exists() and not (tmp_path / "schedule.json").exists()


@pytest.mark.parametrize("argv", [["inspect", "DiT-T/2", "--steps", "0"], ["inspect", "DiT-T/2", "--batch", "0"],
                                  ["export", "DiT-T/2", "unused", "--batch", "0"],
                                  ["calibrate", "DiT-T/2", "--generations", "0"]])
def test_counts_below_one_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[-2] in err and "not >= 1" in err


def test_inspect_names_the_graph_break_of_a_model_it_cannot_capture_whole(capsys):
    assert cli.main(["inspect", "tiny:lumina2"]) == 2
    err = capsys.readouterr().err
    assert "transformer_lumina2.py" in err and "ditfx.optimize" in err and "Traceback" not in err
