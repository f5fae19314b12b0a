"""ditfx.tune: the search finds a point inside the budget whenever the grid has one, an impossible budget returns the
exact configuration with the closest miss, the saved config round-trips, calibration and held-out seeds never
mix, and a study resumes from its workdir. The end-to-end tests drive a tiny reference DiT (DiT-T/2) through a
short Euler loop, compiled with eager."""
from __future__ import annotations

import dataclasses
import json
import random

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


def test_calibration_and_held_out_never_share_a_seed():
    check_cases([1, 2], [3])
    with pytest.raises(ValueError, match="share seed"):
        check_cases([1, 2], [2, 5])
    with pytest.raises(ValueError, match="share seed"):
        check_cases([{"seed": 7, "prompt": "a"}], [{"seed": 7, "prompt": "b"}])
    with pytest.raises(ValueError, match="non-empty"):
        check_cases([], [1])


# ----------------------------------------------------------------------------------- end to end on a tiny DiT
@pytest.fixture(scope="module")
def tiny():
    return zoo.load("DiT-T/2", batch=2)


class SeededLoop:
    """run(target, seed): the zoo's Euler loop from noise drawn from the seed; records the seeds it ran."""

    def __init__(self, named):
        self.named, self.seeds = named, []

    def __call__(self, target, seed):
        self.seeds.append(seed)
        x = self.named.inputs[self.named.latents]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        named = dataclasses.replace(self.named, inputs={**self.named.inputs, self.named.latents: noise})
        with torch.no_grad():
            return zoo.run_loop(named, target, steps=STEPS)


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
    assert run.seeds == []  # nothing runs again: search, timing and held-out check replay from the workdir
    assert ran > 4
    with pytest.raises(ValueError, match="another study"):
        ditfx.tune(tiny.model, run, QualityBudget(psnr=25), **{**kwargs, "calibration": [12]})


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

    out, report, plot = tmp_path / "tuned.json", tmp_path / "report.json", tmp_path / "pareto.png"
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
