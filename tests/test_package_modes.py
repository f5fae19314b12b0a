"""Packages of the techniques with modes (history attention, token budgets) and of a static batch: AOTInductor
builds in a file of their own so pytest-xdist spreads them over the workers (tests/test_package.py holds the
digits package and its checks, tests/test_package_families.py other model families)."""
import json

import pytest
import torch

import ditfx
from conftest import cfg_loop, tiny_model

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.slow]  # AOTInductor builds

STEPS = 8


def test_a_history_student_and_a_token_budget_export(tmp_path):
    """The variants other techniques need: per-step history reads with step heads (the ARD student), and the
    coarse mode of a token budget (a plan of its own, with its adapter's tensors)."""
    from ditfx.models import digits
    from ditfx.models.digits.sampling import class_grid

    def images(pipe, **kw):
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_grid(1), generator=torch.Generator().manual_seed(0), **kw).images

    student = digits.pipeline(student="ard", compiler="eager")
    expected = images(student)
    example = {"hidden_states": torch.randn(10, 1, 16, 16), "timestep": torch.ones(10),
               "class_labels": torch.arange(10), "return_dict": False}
    ditfx.export(student, tmp_path / "ard", example_inputs=example, jobs=1)  # the optimized pipeline's own config
    sigmas = digits.load_student("ard").sigmas
    loaded = ditfx.optimize(digits.DigitsStudentPipeline(ditfx.load(tmp_path / "ard"), digits.make_scheduler(), sigmas))
    assert (images(loaded) - expected).abs().max() <= 1e-5
    assert ditfx.stats(loaded).flops == ditfx.stats(student).flops  # the history's reads counted alike

    config = ditfx.Config(budget=ditfx.TokenBudget(adapter=digits.budget_adapter(), flops=0.6), compiler="eager")
    budget = ditfx.optimize(digits.pipeline(), config)
    expected = images(budget, num_inference_steps=10, guidance_scale=1.5)
    example = {**example, "hidden_states": torch.randn(20, 1, 16, 16), "timestep": torch.ones(20),
               "class_labels": torch.arange(20) % 11}
    ditfx.export(budget, tmp_path / "budget", example_inputs=example, jobs=1)
    loaded = ditfx.optimize(digits.DigitsPipeline(ditfx.load(tmp_path / "budget"), digits.make_scheduler()))
    assert (images(loaded, num_inference_steps=10, guidance_scale=1.5) - expected).abs().max() <= 1e-5
    assert ditfx.stats(loaded).modes == ditfx.stats(budget).modes and ditfx.stats(loaded).modes["p4"]["calls"] > 0
    with pytest.raises(ValueError, match="runs the config it was exported with"):
        ditfx.optimize(loaded, config)


def test_a_package_without_a_dynamic_batch_skips_guidance_at_the_reduced_rows(tmp_path, monkeypatch, recwarn):
    """Where export cannot make the batch dynamic, the package ships one artifact per row count of the runtime's
    bucket rule: Adaptive Guidance's conditional-only steps then run on the conditional rows alone, as in process,
    not on every row."""
    from ditfx.graph import rebatch

    def refuse(*args, **kwargs):
        raise rebatch.RebatchError("a graph whose batch export cannot make dynamic (this test's stand-in)")

    monkeypatch.setattr(rebatch, "symbolic_batch", refuse)
    model, kw = tiny_model("reference", batch=2)  # one sample, its two branches
    config = ditfx.Config(guidance=ditfx.AdaptiveGuidance(gamma=-1.0), compiler="eager")  # cond-only after step 0
    lines = []
    ditfx.export(model, tmp_path / "static", example_inputs=kw, config=config, progress=lines.append, jobs=1)
    plan = json.loads((tmp_path / "static" / "plan" / "plan.json").read_text())
    assert {a["rows"] for a in plan["artifacts"]} == {1, 2} and any("no dynamic batch" in line for line in lines)
    optimized, loaded = ditfx.optimize(model, config), ditfx.load(tmp_path / "static")
    expected = cfg_loop(optimized, kw, "reference", steps=STEPS)
    got = cfg_loop(loaded, kw, "reference", steps=STEPS)
    assert (got - expected).abs().max() <= 1e-5
    assert not [w for w in recwarn if "compute every row" in str(w.message)]  # no fallback to all rows
    a, b = ditfx.stats(optimized), ditfx.stats(loaded)
    assert b.nfe == a.nfe == 2 + (STEPS - 1) and b.nfe_skipped == STEPS - 1  # the uncond rows skipped after step 0
