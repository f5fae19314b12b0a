"""ditfx.tune: the search finds a point inside the budget whenever the grid has one, an impossible budget returns the
exact configuration with the closest miss, the saved config round-trips, calibration and held-out seeds never
mix, and a study resumes from its workdir. The end-to-end tests drive a tiny reference DiT (DiT-T/2) through a
short Euler loop, compiled with eager."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import shutil
import warnings

import pytest
import torch

import ditfx
from ditfx.models import zoo
from ditfx.tuning import Knob, QualityBudget, Space, techniques
from ditfx.tuning.search import ascend, knob_limits, pareto_front, search
from ditfx.tuning.study import check_cases

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

DELTAS = (0.0, 0.8, 1.2, 1.6, 2.4, 3.2, 6.4)
STEPS = 6


# ------------------------------------------------------------------------------- the search on synthetic grids
def _synthetic(sizes, budget_cost, seed):
    """A space whose point (i, j, ...) costs sum of random increasing per-knob costs and is as fast as the
    product of random increasing per-knob gains; inside when its cost is at most ``budget_cost``."""
    rng = random.Random(seed)
    costs = [sorted(rng.uniform(0, 1) for _ in range(n - 1)) for n in sizes]
    gains = [sorted(rng.uniform(1, 3) for _ in range(n - 1)) for n in sizes]
    knobs = tuple(Knob(f"k{j}", tuple(range(n))) for j, n in enumerate(sizes))
    space = Space("synthetic", knobs, build=lambda v: ditfx.Config())
    calls = []

    def cost(point):
        return sum(costs[j][i - 1] if i else 0.0 for j, i in enumerate(point))

    def evaluate(space, point):
        calls.append(point)
        speed = 1.0
        for j, i in enumerate(point):
            speed *= gains[j][i - 1] if i else 1.0
        used = cost(point)
        return {"inside": used <= budget_cost, "speed": speed, "usage": used / budget_cost}

    return space, evaluate, cost, calls


@pytest.mark.parametrize("seed", range(40))
def test_search_finds_an_inside_point_whenever_the_grid_has_one(seed):
    rng = random.Random(1000 + seed)
    sizes = [rng.randint(2, 7) for _ in range(rng.randint(1, 3))]
    space, evaluate, cost, calls = _synthetic(sizes, rng.uniform(0.05, 1.5), seed)
    import itertools

    grid = list(itertools.product(*(range(n) for n in sizes)))
    any_inside = any(evaluate(space, p)["inside"] for p in grid if any(p))
    calls.clear()
    result = search(space, evaluate)
    evaluated = {tuple(p) for p in calls}
    found = [p for p in evaluated if any(p) and evaluate(space, p)["inside"]]
    assert bool(found) == any_inside
    reached = tuple(space.knobs[j].values.index(v) for j, v in enumerate(result["reached"].values()))
    assert evaluate(space, reached)["inside"]
    # bisection: each knob alone costs at most ceil(log2(n)) + 1 evaluations, not n
    assert len(evaluated) < len(grid) or len(grid) <= 8


def test_knob_limits_bisect_and_ascent_combines():
    space, evaluate, cost, calls = _synthetic([9, 9], 0.8, seed=3)
    limits = knob_limits(space, evaluate)
    for j, knob in enumerate(space.knobs):
        alone = [i for i in range(9) if evaluate(space, (i, 0) if j == 0 else (0, i))["inside"]]
        assert limits[knob.name] == max(alone)
    calls.clear()
    knob_limits(space, evaluate)
    assert len(calls) <= 2 * 4  # log2(9) rounded up, per knob
    point = ascend(space, evaluate)
    assert evaluate(space, point)["inside"]
    assert all(not evaluate(space, point[:j] + (point[j] + 1,) + point[j + 1:])["inside"]
               for j in range(2) if point[j] + 1 < 9)  # it stops only where every next notch leaves the budget


def test_the_ascent_also_climbs_from_known_good_starts():
    """Inside: a corner the one-notch ascent from the exact point cannot leave, and an island two notches away
    (two knobs whose effects cancel); a start on the island is climbed from, one outside the budget is ignored."""
    inside = {(0, 0), (1, 0), (0, 1), (2, 0), (2, 2), (3, 2), (2, 3), (3, 3)}

    def evaluate(space, point):
        return {"inside": tuple(point) in inside, "speed": 1.5 ** sum(point), "usage": 0.1 * sum(point)}

    knobs = (Knob("a", (0, 1, 2, 3)), Knob("b", (0, 10, 20, 30)))
    alone = search(Space("s", knobs, build=lambda v: ditfx.Config()), evaluate)
    assert alone["reached"] == {"a": 2, "b": 0}
    started = Space("s", knobs, build=lambda v: ditfx.Config(), starts=({"a": 2, "b": 20}, {"a": 1, "b": 30}))
    assert search(started, evaluate)["reached"] == {"a": 3, "b": 30}
    assert started.fixed({}).starts == started.starts  # a space's choices keep its starts
    with pytest.raises(ValueError, match="not on the knob grid"):
        Space("s", knobs, build=lambda v: ditfx.Config(), starts=({"b": 15},))
    with pytest.raises(ValueError, match="not a knob"):
        Space("s", knobs, build=lambda v: ditfx.Config(), starts=({"c": 1},))


def test_pareto_front():
    rs = [{"speed": 2.0, "quality": {"psnr": 30}}, {"speed": 1.5, "quality": {"psnr": 40}},
          {"speed": 1.4, "quality": {"psnr": 35}}, {"speed": 3.0, "quality": {"psnr": 20}}]
    front = pareto_front(rs, [("psnr", 1)])
    assert [r["speed"] for r in front] == [3.0, 2.0, 1.5]


# ------------------------------------------------------------------------------------------ budget and cases
def test_quality_budget_validation_and_misses():
    with pytest.raises(ValueError, match="metric"):
        QualityBudget(fd=0.1)
    with pytest.raises(ValueError, match="bounds nothing"):
        QualityBudget(psnr=None)
    with pytest.raises(TypeError, match="psnr"):
        QualityBudget(psnr="30")
    budget = QualityBudget(psnr=30, fd=0.1, accuracy=0.01, metric=lambda o, r: {})
    ref = {"psnr": float("inf"), "fd": 100.0, "accuracy": 1.0}
    assert budget.inside({"psnr": 31, "fd": 109, "accuracy": 0.99}, ref)
    misses = budget.misses({"psnr": 27, "fd": 89, "accuracy": 0.97}, ref)
    assert misses["psnr"] == pytest.approx(0.1) and misses["fd"] == pytest.approx(0.1)
    assert misses["accuracy"] == pytest.approx(2.0)  # a drop of 3 points on an allowance of 1
    with pytest.raises(ValueError, match="'fd'"):
        budget.misses({"psnr": 40}, ref)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fd=10.0), ValueError, r"fd must be in \[0, 1\] \(a fraction .*0\.10 = within 10 %"),
    (dict(fd=1.5), ValueError, "fraction"),
    (dict(fd=-0.1), ValueError, "fd must be in"),
    (dict(accuracy=5.0), ValueError, r"accuracy must be in \[0, 1\] \(a fraction: 0\.01 = one point"),
    (dict(ssim=0.0), ValueError, r"ssim must be in \(0, 1\]"),
    (dict(ssim=1.2), ValueError, "ssim must be in"),
    (dict(ssim=-0.5), ValueError, "ssim must be in"),
    (dict(psnr=-3.0), ValueError, "psnr must be >= 0"),
    (dict(psnr=float("nan")), ValueError, "psnr must be a finite number"),
    (dict(psnr=True), TypeError, "psnr must be a number"),
    (dict(limits=None), TypeError, "limits must be a dict"),
    (dict(limits=[("x", (0, 1))]), TypeError, "limits must be a dict"),
    (dict(limits={3: (0, 1)}), TypeError, "names"),
    (dict(limits={"x": (1,)}), ValueError, r"limits\['x'\] must be \(low, high\)"),
    (dict(limits={"x": "01"}), ValueError, r"limits\['x'\] must be \(low, high\)"),
    (dict(limits={"x": (2, 1)}), ValueError, "low 2.0 above its high 1.0"),
    (dict(limits={"x": (None, None)}), ValueError, "neither side"),
    (dict(limits={"x": ("0", 1)}), TypeError, r"limits\['x'\]\[0\] must be a number"),
    (dict(limits={"x": (0, float("inf"))}), ValueError, "finite"),
])
def test_quality_budget_refuses_each_bad_bound(kwargs, error, match):
    with pytest.raises(error, match=match):
        QualityBudget(**{"metric": lambda o, r: {}, **kwargs})


def test_quality_budget_accepts_the_edges_of_its_ranges():
    metric = lambda o, r: {}  # noqa: E731
    assert QualityBudget(fd=1, accuracy=0, metric=metric).fd == 1.0
    assert QualityBudget(psnr=None, ssim=1).ssim == 1.0
    assert QualityBudget(psnr=0, limits={"x": (None, 2), "y": (1, 1)}, metric=metric).psnr == 0.0


def test_nan_measures_and_non_finite_outputs_are_outside_any_budget():
    """max(0, nan) is 0: a NaN measure must not read as no violation; NaN or inf outputs miss whatever else was
    measured on them, and the metric is not asked to measure them."""
    nan = float("nan")
    ref = {"psnr": float("inf"), "fd": 100.0, "accuracy": 0.9, "x": 1.0}
    budget = QualityBudget(psnr=30, fd=0.1, accuracy=0.01, limits={"x": (0.5, 2.0)}, metric=lambda o, r: {})
    good = {"psnr": 40.0, "fd": 101.0, "accuracy": 0.9, "x": 1.0}
    assert budget.inside(good, ref)
    for name in ("psnr", "fd", "accuracy", "x"):
        misses = budget.misses({**good, name: nan}, ref)
        assert misses[name] == float("inf") and not budget.inside({**good, name: nan}, ref)
        assert budget.usage({**good, name: nan}, ref) == float("inf")
    assert budget.misses({**good, "non_finite": 3}, ref) == {"non_finite": float("inf")}
    assert budget.usage({**good, "non_finite": 3}, ref) == float("inf")
    assert QualityBudget(psnr=None, ssim=0.9).misses({"ssim": nan}, {})["ssim"] == float("inf")

    from ditfx.tuning.metrics import measure

    def metric(outputs, reference):
        raise AssertionError("the metric was given non-finite outputs")

    reference = torch.rand(2, 3, 8, 8)
    for bad in (nan, float("inf"), -float("inf")):
        outputs = reference.clone()
        outputs[1, 2, 3, 4] = bad
        measures = measure(outputs, reference, metric)
        assert measures["non_finite"] == 1 and not budget.inside(measures, ref)
    assert "non_finite" not in measure(reference + 0.01, reference)


def test_calibration_and_held_out_never_share_a_seed():
    check_cases([1, 2], [3])
    with pytest.raises(ValueError, match="share seed"):
        check_cases([1, 2], [2, 5])
    with pytest.raises(ValueError, match="share seed"):
        check_cases([{"seed": 7, "prompt": "a"}], [{"seed": 7, "prompt": "b"}])
    with pytest.raises(ValueError, match="non-empty"):
        check_cases([], [1])
    with pytest.raises(ValueError, match="calibration lists the case.* 3 more than once"):
        check_cases([3, 4, 3], [1])
    with pytest.raises(ValueError, match="held_out lists the case"):
        check_cases([3], [{"seed": 1}, {"seed": 1}])
    check_cases([{"seed": 1, "prompt": "a"}, {"seed": 1, "prompt": "b"}], [2])  # one seed, two prompts: two cases


# ----------------------------------------------------------------------------------- end to end on a tiny DiT
@pytest.fixture(scope="module")
def tiny():
    return zoo.load("DiT-T/2", batch=2)


class SeededLoop:
    """run(target, seed): the zoo's Euler loop from noise drawn from the seed; records the seeds it ran."""

    def __init__(self, named, steps=STEPS):
        self.named, self.steps, self.seeds = named, steps, []

    def __call__(self, target, seed):
        self.seeds.append(seed)
        x = self.named.inputs[self.named.latents]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        named = dataclasses.replace(self.named, inputs={**self.named.inputs, self.named.latents: noise})
        with torch.no_grad():
            return zoo.run_loop(named, target, steps=self.steps)


@pytest.fixture(scope="module")
def schedule(tiny):
    return ditfx.calibrate(tiny.model, lambda m: SeededLoop(tiny)(m, 5), generations=1)


@pytest.fixture
def space(schedule):
    return techniques(cache="static", schedule=schedule, guidance=False, deltas=DELTAS)


def test_tune_returns_a_config_inside_the_budget_and_it_round_trips(tiny, space, tmp_path):
    run = SeededLoop(tiny)
    lines = []
    config = ditfx.tune(tiny.model, run, QualityBudget(psnr=25), space=space, calibration=[11, 12],
                        held_out=[21], compiler="aot_eager", timing=0, progress=lines.append,
                        out=tmp_path / "tuned.json")
    chosen = config.tuning["chosen"]
    assert chosen is not None and chosen["inside"] and chosen["held_out"]["inside"]
    assert chosen["speed"] > 1.0 and isinstance(config.cache, ditfx.StaticCache)
    assert config.compiler == "aot_eager"
    # the search ran only the calibration seeds; the held-out seed ran only for the held-out check (reference, chosen)
    assert set(run.seeds) == {11, 12, 21} and run.seeds.count(21) == 2
    first_held = run.seeds.index(21)
    assert all(s == 21 for s in run.seeds[first_held:])
    assert any("held-out check" in line for line in lines)
    # every evaluated point inside the budget is no faster than the chosen one (timing=0: FLOPs decide)
    assert all(p["speed"] <= chosen["speed"] + 1e-9 for p in config.tuning["points"] if p["inside"])
    loaded = ditfx.Config.load(tmp_path / "tuned.json")
    assert repr(loaded) == repr(config) and loaded.tuning["chosen"]["values"] == chosen["values"]
    json.loads((tmp_path / "tuned.json").read_text())  # plain JSON, no inf
    # the tuned config applied by hand reproduces the held-out PSNR the study reported
    compiled = ditfx.optimize(tiny.model, dataclasses.replace(loaded, compiler="eager"))
    with ditfx.generation(compiled):
        fast = run(compiled, 21)
    reference = run(tiny.model, 21)
    from ditfx.tuning.metrics import psnr

    assert psnr(fast, reference) == pytest.approx(float(chosen["held_out"]["measures"]["psnr"]), rel=1e-4)


def test_impossible_budget_returns_the_exact_config_with_the_closest_miss(tiny, space):
    run = SeededLoop(tiny)
    with pytest.warns(UserWarning, match="closest miss"):
        config = ditfx.tune(tiny.model, run, QualityBudget(psnr=500), space=space, calibration=[11],
                            held_out=[21], compiler="eager", timing=0, progress=False)
    assert config.cache is None and config.guidance is None and config.budget is None
    assert config.tuning["chosen"] is None and "reference" in config.tuning["message"]
    miss = config.tuning["closest_miss"]
    outside = [p for p in config.tuning["points"] if not p["inside"]]
    assert miss in outside and miss["misses"]["psnr"] == min(p["misses"]["psnr"] for p in outside)
    assert 21 not in run.seeds  # nothing to check on the held-out inputs


def test_tune_resumes_from_its_workdir(tiny, space, tmp_path):
    run = SeededLoop(tiny)
    kwargs = dict(space=space, calibration=[11], held_out=[21], compiler="eager", timing=0, progress=False,
                  workdir=tmp_path / "study")
    first = ditfx.tune(tiny.model, run, QualityBudget(psnr=25), **kwargs)
    ran = len(run.seeds)
    run.seeds.clear()
    again = ditfx.tune(tiny.model, run, QualityBudget(psnr=25), **kwargs)
    assert repr(again) == repr(first)
    # only the reference runs again (it must reproduce the workdir's outputs); search, timing and held-out check
    # replay from the workdir
    assert run.seeds == [11]
    assert ran > 4
    with pytest.raises(ValueError, match="another study .*its calibration cases differ"):
        ditfx.tune(tiny.model, run, QualityBudget(psnr=25), **{**kwargs, "calibration": [12]})
    looser = ditfx.tune(tiny.model, run, QualityBudget(psnr=20), **kwargs)  # a budget may change on resuming
    assert looser.tuning["budget"]["psnr"] == 20.0


def test_tune_rejects_bad_input_before_work(tiny, space):
    run = SeededLoop(tiny)
    with pytest.raises(ValueError, match="share seed"):
        ditfx.tune(tiny.model, run, space=space, calibration=[1], held_out=[1])
    with pytest.raises(TypeError, match="run"):
        ditfx.tune(tiny.model, None, space=space)
    with pytest.raises(ValueError, match="inner backend"):
        ditfx.tune(tiny.model, run, space=space, compiler="tvm")
    optimized = ditfx.optimize(tiny.model, ditfx.Config(compiler="eager"))
    run(optimized, 1)
    with pytest.raises(ValueError, match="optimized by ditfx already"):
        ditfx.tune(optimized, run, space=space)
    assert run.seeds == [1]


def test_a_run_that_ignores_its_seed_is_refused(tiny, space):
    calls = iter(range(1000))

    def unseeded(target, seed):
        torch.manual_seed(next(calls))
        x = tiny.inputs[tiny.latents]
        named = dataclasses.replace(tiny, inputs={**tiny.inputs, tiny.latents: torch.randn(x.shape)})
        with torch.no_grad():
            return zoo.run_loop(named, target, steps=2)

    with pytest.raises(ValueError, match="same outputs every time"):
        ditfx.tune(tiny.model, unseeded, space=space, calibration=[1], held_out=[2], timing=0, progress=False)


def test_config_save_load_round_trips_every_technique(tmp_path):
    from ditfx.models import digits
    from ditfx.models.digits.calibrate import LINEAR_AG_FILE, SCHEDULE_FILE, shipped_file

    configs = [
        ditfx.Config(cache=ditfx.StaticCache(0.3, shipped_file(SCHEDULE_FILE), per_block=False, forecast="linear"),
                     guidance=ditfx.AdaptiveGuidance(0.98, fade=2.0), compiler="eager", kernels=True,
                     budget=ditfx.TokenBudget(adapter=digits.budget_adapter(), flops=0.6)),
        ditfx.Config(cache=ditfx.DynamicCache(0.1, max_reuse=3), guidance=ditfx.LinearAG(shipped_file(LINEAR_AG_FILE))),
        ditfx.Config(guidance=ditfx.GuidanceWindow(0.2, 0.8), budget=ditfx.TokenBudget(weak_until=[0.2, 0.5],
                                                                                      patch_size=[8, 4])),
        ditfx.Config(history=ditfx.HistoryAttention(2, 4, heads={"weight": torch.randn(4, 3, 5),
                                                                  "bias": torch.randn(4, 3)})),
    ]
    for k, config in enumerate(configs):
        path = config.save(tmp_path / f"c{k}.json")
        loaded = ditfx.Config.load(path)
        assert repr(loaded) == repr(config)
    assert torch.equal(ditfx.Config.load(tmp_path / "c3.json").history.heads["weight"],
                       configs[3].history.heads["weight"])
    assert ditfx.Config.load(tmp_path / "c1.json").cache == configs[1].cache
    with pytest.raises(ValueError, match=".json"):
        configs[1].save(tmp_path / "c.yaml")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a ditfx config"):
        ditfx.Config.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="Config.save"):
        ditfx.Config.load(tmp_path / "missing.json")


def test_cli_tune_writes_config_report_and_plot(tmp_path, capsys):
    from ditfx import cli

    # the report's and the plot's folders are made
    out, report, plot = tmp_path / "tuned.json", tmp_path / "reports" / "report.json", tmp_path / "plots" / "pareto.png"
    assert cli.main(["tune", "DiT-T/2", "--steps", "16", "--psnr", "25", "--compiler", "eager", "--timing-rounds",
                     "0", "--calibration-seeds", "3", "--held-out-seeds", "4", "--out", str(out), "--json",
                     str(report), "--plot", str(plot), "--workdir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    data = json.loads(report.read_text())
    config = ditfx.Config.load(out)
    assert data["config"] == repr(config) and config.compiler == "eager"
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert data["chosen"] is not None and data["chosen"]["held_out"]["inside"]  # at 16 steps some delta skips
    assert "tuned:" in printed and isinstance(config.cache, ditfx.StaticCache)
    assert cli.main(["tune", "DiT-T/2", "--fd", "0.1"]) == 2  # digits-only measures on another model
    assert "--fd and --accuracy" in capsys.readouterr().err


@pytest.mark.slow  # a study on a diffusers pipeline
@pytest.mark.parametrize("name", ["pixart_alpha"])  # a diffusers text-to-image pipeline, batched guidance
def test_tune_an_unmodified_diffusers_pipeline_with_the_default_space(name):
    """The default space (a schedule calibrated here on the pipeline, Adaptive Guidance), searched on every fourth
    value of its knobs (each evaluation traces a fresh copy of the pipeline): a config comes back, the user's
    pipeline is left uncompiled, and the exact point reproduced the reference (else tune raises)."""
    import pipelines

    from ditfx.tuning import default_space

    pipe, kwargs = pipelines.build(name)

    def run(p, seed):
        return pipelines.run(p, kwargs, seed)

    space = default_space(pipe, run, 1)
    assert space.name == "static+guidance" and [k.name for k in space.knobs] == ["delta", "gamma"]
    coarse = dataclasses.replace(space, knobs=tuple(Knob(k.name, k.values[::4]) for k in space.knobs))
    config = ditfx.tune(pipe, run, QualityBudget(psnr=20), space=coarse, calibration=[1], held_out=[2],
                        compiler="eager", timing=0, progress=False)
    assert config.tuning["spaces"] == ["static+guidance"]
    assert config.tuning["evaluations"] >= 2
    chosen = config.tuning["chosen"]
    assert chosen is None or chosen["held_out"]["inside"]
    assert getattr(pipe.transformer, "_compiled_call_impl", None) is None  # the user's pipeline is untouched
    with pytest.raises(ValueError, match="not optimized"):
        ditfx.stats(pipe)


def test_the_digits_space_starts_from_the_hand_picked_configuration():
    from ditfx.models import digits
    from ditfx.models.digits.tuning import HAND_PICKED

    space = digits.tuning_space(digits.TuningRun(steps=2))
    assert [k.name for k in space.knobs] == ["delta", "gamma", "flops"] and space.starts == (HAND_PICKED,)
    assert space.choices == {"fade": (1.0, 1.5, 2.0)} and all(v.starts == space.starts for v in space.variants())
    config = space.config(space.point(HAND_PICKED))
    assert (config.cache.delta, config.guidance.gamma, config.budget.flops) == (0.7, 0.99, 0.7)
    # a space without some of its knobs keeps the start's others; without guidance there is no gamma to start at
    unguided = digits.tuning_space(digits.TuningRun(guidance_scale=1.0, steps=2))
    assert unguided.starts == ({"delta": 0.7, "flops": 0.7},)


def test_a_point_that_fails_the_held_out_check_is_replaced_by_its_safer_neighbours():
    from ditfx.tuning.study import _backed_off

    knobs = (Knob("a", (0, 1, 2, 3)), Knob("b", (0, 10, 20)))
    space = Space("s", knobs, build=lambda v: ditfx.Config(cache=ditfx.DynamicCache(0.1 * v["a"]) if v["a"] else None,
                                                           guidance=ditfx.AdaptiveGuidance(1 - v["b"] / 1000)))

    class Study:  # the two things _backed_off asks of a study: space_of, evaluate
        evaluated = []

        def space_of(self, r):
            return space

        def evaluate(self, s, point):
            self.evaluated.append(point)
            return {"inside": point != (1, 2), "speed": 1.0 + sum(point), "point": list(point), "space": "s",
                    "key": repr(s.config(point))}

    study = Study()
    failed = {"key": "failed", "space": "s", "point": [2, 2]}
    timed = {"key": "t", "wall_speedup": 2.0, "speed": 2.5, "point": [0, 1]}
    slow = {"key": "slow", "speed": 1.5, "point": [0, 0]}
    out = _backed_off(study, failed, [timed, slow])
    assert study.evaluated == [(1, 2), (2, 1)]  # one notch back on each knob it moved
    assert [r["point"] for r in out] == [[0, 1], [2, 1], [0, 0]]  # timed first, then by speed; (1, 2) is outside


# ------------------------------------------------------------------------------- outputs that cannot be measured
class PoisonedLoop(SeededLoop):
    """The seeded loop whose samples hold a NaN on the ``poisoned`` seeds whenever an optimized copy skipped
    blocks (the reference and the exact configuration stay finite)."""

    def __init__(self, named, poisoned):
        super().__init__(named)
        self.poisoned = poisoned

    def __call__(self, target, seed):
        out = super().__call__(target, seed)
        if seed in self.poisoned and target is not self.named.model and ditfx.stats(target).block_evals_skipped:
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        return out


def test_a_configuration_with_nan_outputs_is_never_inside_the_budget(tiny, schedule):
    """Every configuration that skips blocks gives a NaN on the calibration seed: none is inside (a NaN PSNR once
    read as no miss, max(0, nan) being 0), the progress says why, the front leaves them out."""
    run, lines = PoisonedLoop(tiny, poisoned={11}), []
    coarse = techniques(cache="static", schedule=schedule, guidance=False, deltas=(0.0, 1.6, 3.2))
    with pytest.warns(UserWarning, match=r"no accelerated point .*closest miss .*1 NaN or infinite output value"):
        config = ditfx.tune(tiny.model, run, QualityBudget(psnr=25), space=coarse, calibration=[11], held_out=[21],
                            compiler="eager", timing=0, progress=lines.append)
    assert config.tuning["chosen"] is None and config.cache is None
    points = config.tuning["points"]
    assert points and all(p["speed"] > 1.0 and not p["inside"] and p["measures"]["non_finite"] == 1 for p in points)
    assert all(p["misses"] == {"non_finite": "inf"} for p in points)  # JSON writes inf as a string
    assert config.tuning["front"] == []
    assert any("outside (1 NaN or infinite output value(s))" in line for line in lines)
    assert 21 not in run.seeds


def test_a_configuration_with_nan_outputs_on_the_held_out_inputs_fails_its_check(tiny, schedule):
    run, lines = PoisonedLoop(tiny, poisoned={21}), []
    coarse = techniques(cache="static", schedule=schedule, guidance=False, deltas=(0.0, 1.6))
    with pytest.warns(UserWarning, match="held-out inputs"):
        config = ditfx.tune(tiny.model, run, QualityBudget(psnr=5), space=coarse, calibration=[11],
                            held_out=[21], compiler="eager", timing=0, progress=lines.append)
    assert config.tuning["chosen"] is None
    assert any(p["inside"] for p in config.tuning["points"])  # on the calibration seed, finite and inside
    assert any("held-out check" in line and "outside the budget (1 NaN or infinite output value(s))" in line
               for line in lines)


def test_a_configuration_whose_measure_is_nan_is_outside_the_budget(tiny, schedule):
    """Finite outputs, but the metric gives NaN on every configuration's (and a number on the reference's)."""
    budget = QualityBudget(psnr=None, limits={"score": (0.0, None)},
                           metric=lambda o, r: {"score": 1.0 if o is r or torch.equal(o, r) else math.nan})
    coarse = techniques(cache="static", schedule=schedule, guidance=False, deltas=(0.0, 1.6))
    lines = []
    with pytest.warns(UserWarning, match=r"closest miss .*\(score nan, not finite\)"):
        config = ditfx.tune(tiny.model, SeededLoop(tiny), budget, space=coarse, calibration=[11], held_out=[21],
                            compiler="eager", timing=0, progress=lines.append)
    assert config.tuning["chosen"] is None and config.tuning["front"] == []
    assert any("outside (score nan, not finite)" in line for line in lines)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["everywhere", "one value"])
def test_a_non_finite_reference_run_is_an_error_before_the_search(tiny, space, bad, where):
    loop = SeededLoop(tiny)

    def run(target, seed):
        out = loop(target, seed)
        if where == "everywhere":
            return torch.full_like(out, bad)
        out = out.clone()
        out[1, 0, 2, 2] = bad
        return out

    with pytest.raises(ValueError, match=r"run\(target, case\) gave (1|\d+) NaN or infinite value.* reference run"):
        ditfx.tune(tiny.model, run, space=space, calibration=[11, 12], held_out=[21], progress=False)
    assert loop.seeds == [11, 12]  # the reference run, nothing of the search


@pytest.mark.parametrize("shape_of, match", [
    (lambda out: out.sum(), r"at least one dimension and one element, got shape \(\) for case 11"),
    (lambda out: out[:0], r"at least one dimension and one element, got shape \(0, 4, 8, 8\)"),
    (lambda out: out.numpy(), r"as a tensor .*got ndarray"),
    (lambda out: torch.zeros_like(out), r"samples of one constant value \(0, shape"),
    (lambda out: out[:1] if out[0, 0, 0, 0] > out[1, 0, 0, 0] else out, "samples of the shapes"),
])
def test_a_run_that_returns_no_samples_is_named(tiny, space, shape_of, match):
    loop = SeededLoop(tiny)
    with pytest.raises((TypeError, ValueError), match=match):
        ditfx.tune(tiny.model, lambda target, seed: shape_of(loop(target, seed)), space=space,
                   calibration=[11, 12, 13], held_out=[21], progress=False)
    assert set(loop.seeds) <= {11, 12, 13}


def test_a_run_that_gives_every_case_the_same_samples_is_refused(tiny, space):
    loop = SeededLoop(tiny)
    with pytest.raises(ValueError, match="the same samples for the cases 11 and 12: it must draw its noise"):
        ditfx.tune(tiny.model, lambda target, seed: loop(target, 0), space=space, calibration=[11, 12],
                   held_out=[21], progress=False)
    # one calibration case: the held-out reference is the first to repeat it
    coarse = dataclasses.replace(space, knobs=(Knob("delta", (0.0, 1.6)),))
    with pytest.raises(ValueError, match="the same samples for the cases 11 and 21"):
        ditfx.tune(tiny.model, lambda target, seed: loop(target, 0), QualityBudget(psnr=5), space=coarse,
                   calibration=[11], held_out=[21], timing=0, progress=False)


def test_a_run_that_never_calls_its_target_is_named(tiny, space):
    loop = SeededLoop(tiny)
    with pytest.raises(ValueError, match=r"compiled nothing .*run\(target, case\) never called the optimized "
                                         "target it was given"):
        ditfx.tune(tiny.model, lambda target, seed: loop(tiny.model, seed), space=space, calibration=[11],
                   held_out=[21], progress=False)


def test_a_model_ditfx_cannot_apply_to_names_why_without_the_warnings():
    """A model without blocks: its graph runs without ditfx's passes; the reason is in the error even where the
    warning is not shown (a warning shows once per place)."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))

    def run(target, seed):
        return target(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed)))

    space = Space("plain", (Knob("k", (0, 1)),), build=lambda v: ditfx.Config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"could not apply .*1 of 1 graph\(s\) ran without its passes \(.+\)"):
            ditfx.tune(mlp, run, space=space, calibration=[1], held_out=[2], progress=False)


def test_a_metric_that_does_not_measure_the_reference_is_named(tiny, space):
    loop = SeededLoop(tiny)
    nan_metric = QualityBudget(psnr=None, limits={"score": (0.0, None)}, metric=lambda o, r: {"score": math.nan})
    with pytest.raises(ValueError, match="bounds 'score', but QualityBudget.metric returned score=nan"):
        ditfx.tune(tiny.model, loop, nan_metric, space=space, calibration=[11], held_out=[21], progress=False)
    silent = QualityBudget(psnr=None, limits={"score": (0.0, None)}, metric=lambda o, r: {})
    with pytest.raises(ValueError, match="returned score=None"):
        ditfx.tune(tiny.model, loop, silent, space=space, calibration=[11], held_out=[21], progress=False)
    assert loop.seeds == [11, 11]  # the reference runs only


# ------------------------------------------------------------------------------ arguments checked before work
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(out="tuned.txt"), ValueError, r"tune: out must be a path ending in \.json, got 'tuned.txt'"),
    (dict(out="{tmp}/a_folder.json"), ValueError, "tune: out .*a_folder.json is a directory"),
    (dict(out="{tmp}/a_file/tuned.json"), ValueError, "tune: out needs the folder .*a_file is a file"),
    (dict(out=3), TypeError, "tune: out must be a file path"),
    (dict(workdir="{tmp}/a_file"), ValueError, "tune: workdir .*a_file is a file, not a directory"),
    (dict(workdir="{tmp}/a_file/study"), ValueError, "tune: workdir needs the folder .*a_file is a file"),
    (dict(progress="yes"), TypeError, "tune: progress must be"),
    (dict(label=3), TypeError, "tune: label must be a str"),
    (dict(space="static"), ValueError, "tune: space must be a ditfx.tuning.Space"),
    (dict(margin=1.0), ValueError, "margin"),
    (dict(margin=math.nan), ValueError, "margin"),
    (dict(timing=-1), ValueError, "timing"),
    (dict(budget=QualityBudget), TypeError, "budget must be a ditfx.QualityBudget"),
    (dict(calibration=[11, 11]), ValueError, "more than once"),
])
def test_tune_checks_every_argument_before_work(tiny, space, tmp_path, kwargs, error, match):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder.json").mkdir()
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    run = SeededLoop(tiny)
    with pytest.raises(error, match=match):
        ditfx.tune(tiny.model, run, **{"space": space, "calibration": [11], "held_out": [21], "progress": False,
                                       **kwargs})
    assert run.seeds == []


def test_tune_names_what_it_takes_for_the_model(space):
    run = SeededLoop(None)
    with pytest.raises(TypeError, match="tune: pipe_or_model must be an nn.Module"):
        ditfx.tune("DiT-T/2", run, space=space, progress=False)
    assert run.seeds == []


# ---------------------------------------------------------------------------------- resuming another study
@pytest.fixture(scope="module")
def study_dir(tiny, schedule, tmp_path_factory):
    """A finished study's workdir (copied by each test that changes it)."""
    workdir = tmp_path_factory.mktemp("tune") / "study"
    space = techniques(cache="static", schedule=schedule, guidance=False, deltas=(0.0, 1.6))
    ditfx.tune(tiny.model, SeededLoop(tiny), QualityBudget(psnr=5), space=space, calibration=[11], held_out=[21],
               compiler="eager", timing=0, progress=False, workdir=workdir)
    return workdir, space


def _resume(tiny, study_dir, tmp_path, model=None, run=None):
    workdir, space = study_dir
    resumed = shutil.copytree(workdir, tmp_path / "study")
    run = run or SeededLoop(tiny)
    config = ditfx.tune(model or tiny.model, run, QualityBudget(psnr=5), space=space, calibration=[11],
                        held_out=[21], compiler="eager", timing=0, progress=False, workdir=resumed)
    return config, run


def test_a_resumed_study_with_other_weights_is_refused(tiny, study_dir, tmp_path):
    changed = copy.deepcopy(tiny.model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[7] += 1e-3  # one value of millions
    run = SeededLoop(tiny)
    with pytest.raises(ValueError, match=r"holds another study \(its model's weights differ .*delete"):
        _resume(tiny, study_dir, tmp_path, model=changed, run=run)
    assert run.seeds == []
    _, again = _resume(tiny, study_dir, tmp_path / "same", model=copy.deepcopy(tiny.model))  # a copy: same weights
    assert again.seeds == [11]


def test_a_resumed_study_whose_run_changed_is_refused(tiny, study_dir, tmp_path):
    """A run whose repr is the same (a plain object's) but whose steps changed: its reference outputs differ."""
    run = SeededLoop(tiny, steps=STEPS - 2)
    with pytest.raises(ValueError, match=r"the workdir .*study holds a study whose reference run gave other outputs "
                                         r"on the calibration inputs \(by .* \(max abs\)\).*another workdir"):
        _resume(tiny, study_dir, tmp_path, run=run)
    assert run.seeds == [11]  # the reference, then nothing


def test_a_resumed_study_with_another_run_repr_is_refused(tiny, study_dir, tmp_path):
    class Named(SeededLoop):
        def __repr__(self):
            return f"Named(steps={self.steps})"

    run = Named(tiny)
    with pytest.raises(ValueError, match=r"its run differ"):
        _resume(tiny, study_dir, tmp_path, run=run)
    assert run.seeds == []


def test_a_resumed_study_with_another_metric_label_or_cases_is_refused(tiny, study_dir, tmp_path):
    workdir, space = study_dir
    run = SeededLoop(tiny)
    kwargs = dict(space=space, calibration=[11], held_out=[21], compiler="eager", timing=0, progress=False,
                  workdir=workdir)
    measured = QualityBudget(psnr=5, limits={"score": (0.0, None)}, metric=lambda o, r: {"score": 1.0})
    for changed, words in ((dict(budget=measured), "budget's metric"), (dict(label="another"), "model label"),
                           (dict(held_out=[22]), "held-out cases")):
        with pytest.raises(ValueError, match=f"its {words} differ"):
            ditfx.tune(tiny.model, run, **{"budget": QualityBudget(psnr=5), **kwargs, **changed})
    assert run.seeds == []


def test_a_damaged_workdir_is_named(tiny, study_dir, tmp_path):
    workdir, _ = study_dir
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged / "study")
    (damaged / "study" / "reference_calibration.safetensors").unlink()
    with pytest.raises(ValueError, match=r"reference_calibration.safetensors is missing"):
        _resume(tiny, (damaged / "study", study_dir[1]), tmp_path / "a")
    (damaged / "study" / "tune_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"tune_state.json is not valid JSON"):
        _resume(tiny, (damaged / "study", study_dir[1]), tmp_path / "b")
    (damaged / "study" / "tune_state.json").write_text(json.dumps({"format": "ditfx.tune/1"}))
    with pytest.raises(ValueError, match=r"in format 'ditfx.tune/1'.*another workdir"):
        _resume(tiny, (damaged / "study", study_dir[1]), tmp_path / "c")


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, match", [
    (["digits", "--fd", "10"], r"--fd.*fd must be in \[0, 1\] \(a fraction of the reference's FD: 0.10 = within"),
    (["digits", "--accuracy", "1.5"], r"--accuracy.*accuracy must be in \[0, 1\] \(a fraction"),
    (["no-such-model", "--ssim", "0"], r"ssim must be in \(0, 1\]"),
    (["no-such-model", "--psnr", "nan"], "psnr must be a finite number"),
    (["no-such-model", "--out", "x.txt"], r"--out must be a path ending in \.json"),
    (["no-such-model", "--json", "r.txt"], r"--json must be a path ending in \.json"),
    (["no-such-model", "--plot", "p.jpg"], r"--plot must be a path ending in \.png or \.pdf or \.svg"),
    (["no-such-model", "--out", "{tmp}/same.json", "--json", "{tmp}/same.json"], "--out and --json both name"),
    (["no-such-model", "--workdir", "{tmp}/a_file"], "--workdir .*a_file is a file, not a directory"),
    (["no-such-model", "--json", "{tmp}/a_file/r.json"], "--json needs the folder"),
    (["no-such-model", "--steps", "0"], "--steps must be >= 1"),
    (["no-such-model", "--batch", "0"], "--batch must be >= 1"),
    (["no-such-model", "--threads", "0"], "--threads must be >= 1"),
    (["no-such-model", "--timing-rounds", "-1"], "--timing-rounds must be >= 0"),
    (["no-such-model", "--margin", "1"], r"--margin is a fraction .*\[0, 1\)"),
    (["no-such-model", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["no-such-model", "--calibration-seeds", "3", "--held-out-seeds", "3"], "share seed"),
    (["no-such-model", "--compiler", "eager", "--fd", "0.1"], "--fd and --accuracy are measured on the digits"),
])
def test_cli_tune_checks_every_argument_before_it_loads_a_model(argv, match, tmp_path, capsys):
    """An unknown model would fail to load: each message here is the argument's, so nothing was loaded first."""
    from ditfx import cli

    (tmp_path / "a_file").write_text("not a folder")
    assert cli.main(["tune", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "same.json").exists()
