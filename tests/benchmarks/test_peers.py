"""The pure parts of benchmarks/peers.py: the quality budget, Pareto fronts, sweep narrowing, the method table."""

import json
import math

import pytest


@pytest.fixture(scope="module")
def peers(load_benchmark):
    return load_benchmark("peers")


def point(knob, speedup, psnr, fd, **kw):
    return {"knob": knob, "speedup": speedup, "psnr": psnr, "fd": fd, "fd_gap": abs(fd - 200.0) / 200.0,
            "error": None, **kw}


def test_budget_needs_psnr_and_fd_on_both_sides(peers):
    budget = peers.Budget(min_psnr=30.0, fd_tolerance=0.10)
    assert budget.admits(point(1, 2.0, 30.0, 200.0), 200.0)
    assert not budget.admits(point(1, 2.0, 29.99, 200.0), 200.0)
    assert budget.admits(point(1, 2.0, 35.0, 220.0), 200.0)  # exactly 10 % above
    assert budget.admits(point(1, 2.0, 35.0, 180.0), 200.0)  # exactly 10 % below
    assert not budget.admits(point(1, 2.0, 35.0, 221.0), 200.0)
    assert not budget.admits(point(1, 2.0, 35.0, 179.0), 200.0)
    assert budget.admits(point(None, 1.0, math.inf, 200.0), 200.0)  # the baseline against itself
    assert not budget.admits({"knob": 1, "error": "boom"}, 200.0)


def test_pareto_front_keeps_undominated_points_fastest_first(peers):
    a = point("a", 3.0, 31.0, 230.0)   # fastest, worst quality
    b = point("b", 2.0, 40.0, 205.0)
    c = point("c", 1.5, 35.0, 210.0)   # dominated by b
    d = point("d", 1.0, 60.0, 200.0)   # best quality
    e = {"knob": "e", "error": "failed"}
    front = peers.pareto_front([c, a, d, b, e])
    assert [p["knob"] for p in front] == ["a", "b", "d"]
    # equal points do not dominate each other
    assert len(peers.pareto_front([point("x", 2.0, 40.0, 205.0), point("y", 2.0, 40.0, 205.0)])) == 2


def test_best_in_budget_is_the_fastest_admitted_point(peers):
    budget = peers.Budget()
    points = [point(0.1, 1.5, 40.0, 205.0), point(0.2, 2.5, 31.0, 215.0), point(0.3, 4.0, 25.0, 260.0)]
    assert peers.best_in_budget(points, budget, 200.0)["knob"] == 0.2
    assert peers.best_in_budget(points[2:], budget, 200.0) is None
    summary = peers.summarize(points, budget, 200.0)
    assert summary["best_speedup_in_budget"] == 2.5 and summary["best_setting"] == 0.2
    assert [p["knob"] for p in summary["pareto"]] == [0.3, 0.2, 0.1]
    empty = peers.summarize([], budget, 200.0)
    assert empty["best_speedup_in_budget"] is None and empty["pareto"] == []


def test_compiled_sweep_repeats_the_in_budget_knobs_and_the_next(peers):
    values = [1, 2, 3, 4, 5]
    pts = [{"in_budget": b} for b in (True, True, False, True, False)]
    assert peers.near_budget_values(values, pts) == [1, 2, 4, 5]
    assert peers.near_budget_values(values, [{"in_budget": False}] * 5) == [1]
    assert peers.near_budget_values(values, [{"in_budget": True}] * 5) == values


def test_report_is_strict_json(peers):
    report = peers.json_safe({"psnr": math.inf, "points": [{"x": -math.inf, "y": 1.5}], "t": (math.nan,)})
    assert report == {"psnr": None, "points": [{"x": None, "y": 1.5}], "t": [None]}
    json.dumps(report, allow_nan=False)


def test_method_table(peers):
    methods = peers.all_methods()
    names = [m.name for m in methods]
    assert len(names) == len(set(names))
    assert names[:2] == ["eager", "torch.compile"]
    by_name = {m.name: m for m in methods}
    for m in methods:
        assert m.values, m.name
        if m.follows:  # a compiled variant runs after the eager method whose sweep it narrows
            assert m.compiled and names.index(m.follows) < names.index(m.name)
            assert by_name[m.follows].values == m.values
    families = {m.family for m in methods}
    assert {"baseline", "torch", "diffusers", "cache-dit", "ditfx"} <= families
    assert all(m.compiled for m in methods if m.family == "ditfx")
    assert [m.name for m in peers.select(methods, ["ditfx*"])] == [n for n in names if n.startswith("ditfx")]


def test_table_formats_errors_and_missing_budget(peers):
    report = {"methods": {
        "eager": {"best_speedup_in_budget": 1.0, "best_setting": None,
                  "best_point": {"knob": None, "psnr": math.inf, "fd": 200.0, "accuracy": 1.0}, "points": [{}],
                  "error": None},
        "peer": {"best_speedup_in_budget": None, "best_point": None, "points": [{}, {}], "error": None},
        "broken": {"points": [], "error": "AttributeError: no norm1"},
    }}
    text = peers.format_table(report)
    assert "none in budget" in text and "AttributeError" in text and "inf" in text


def test_compare_ditfx_with_the_best_peer(peers):
    methods = {
        "eager": {"family": "baseline", "best_speedup_in_budget": 1.0},
        "peer a": {"family": "diffusers", "best_speedup_in_budget": 2.0},
        "peer b": {"family": "cache-dit", "best_speedup_in_budget": None},
        "ditfx x": {"family": "ditfx", "best_speedup_in_budget": 2.5},
        "ditfx y": {"family": "ditfx", "best_speedup_in_budget": 1.5},
    }
    out = peers.compare(methods)
    assert out == {"ditfx": 2.5, "ditfx_method": "ditfx x", "best_peer": 2.0, "best_peer_method": "peer a",
                   "ditfx_beats_every_peer": True}
    methods["peer b"]["best_speedup_in_budget"] = 3.0
    assert peers.compare(methods)["ditfx_beats_every_peer"] is False


def test_summaries_recompute_from_points(peers, tmp_path):
    budget = peers.Budget()
    baseline = {"fd": 200.0, "wall_s": 10.0, "cpu_s": 9.0}
    results = {
        "eager": {"family": "baseline", "knob": "-", "points": [
            {"knob": None, "speedup": 1.0, "cpu_speedup": 1.0, "psnr": None, "fd": 200.0, "error": None}]},
        "ditfx s": {"family": "ditfx", "knob": "delta", "points": [
            {"knob": 0.1, "speedup": 2.0, "cpu_speedup": 2.2, "psnr": 35.0, "fd": 210.0, "error": None},
            {"knob": 0.3, "speedup": 3.0, "cpu_speedup": 3.1, "psnr": 28.0, "fd": 240.0, "error": None}]},
        "peer": {"family": "diffusers", "knob": "t", "error": "ValueError: no", "points": []},
    }
    out = peers.summaries(baseline, results, budget)
    assert out["methods"]["eager"]["best_speedup_in_budget"] == 1.0  # psnr null means identical: inf
    assert out["methods"]["ditfx s"]["best_setting"] == 0.1
    assert out["methods"]["ditfx s"]["best_cpu_speedup_in_budget"] == 2.2
    assert out["methods"]["peer"]["error"] == "ValueError: no"
    assert out["summary"]["wall"]["ditfx_beats_every_peer"] is True
    path = tmp_path / "report.json"
    path.write_text(json.dumps(peers.json_safe({"baseline": baseline, **out}), allow_nan=False))
    again = peers.from_report(str(path), peers.Budget(min_psnr=36.0))
    assert again["methods"]["ditfx s"]["best_speedup_in_budget"] is None
    assert again["budget"]["min_psnr_db"] == 36.0


def test_confirmation_takes_the_leading_ditfx_methods_and_peers(peers):
    def m(family, wall, cpu, knob):
        best = None if wall is None else {"knob": knob}
        return {"family": family, "best_point": best, "best_speedup_in_budget": wall,
                "best_cpu_speedup_in_budget": cpu, "best_setting": knob}

    summary = {"methods": {
        "eager": m("baseline", 1.0, 1.0, None),
        "ditfx a": m("ditfx", 3.0, 2.5, 0.3), "ditfx b": m("ditfx", None, None, None),
        "ditfx c": m("ditfx", 2.0, 2.0, 0.1), "ditfx d": m("ditfx", 2.5, 2.6, 0.2), "ditfx e": m("ditfx", 1.5, 1.5, 1),
        "p1": m("diffusers", 4.0, 2.0, 12), "p2": m("diffusers", 3.5, 3.0, 0.1), "p3": m("cache-dit", 2.0, 3.2, "x"),
        "p4": m("cache-dit", 1.0, 1.0, 0.2),
    }}
    assert peers.confirmation_candidates(summary, 2) == [
        ("ditfx a", 0.3), ("ditfx d", 0.2), ("p1", 12), ("p2", 0.1), ("p3", "x")]


def test_one_sided_fd_budget_admits_a_lower_fd(peers):
    upper = peers.Budget(fd_side="upper")
    assert upper.admits(point(1, 2.0, 35.0, 150.0), 200.0)   # 25 % below: no loss on this side
    assert not upper.admits(point(1, 2.0, 35.0, 221.0), 200.0)
    assert not peers.Budget().admits(point(1, 2.0, 35.0, 150.0), 200.0)
    assert "fd <= 1.1 * fd_baseline" in upper.to_dict()["rule"]
    with pytest.raises(ValueError):
        peers.Budget(fd_side="lower")


def test_resume_runs_only_missing_knobs_and_merges_in_sweep_order(peers):
    have = {"name": "m", "error": None, "prepare_s": 3.0,
            "points": [{"knob": {"t": 1, "k": 2}, "speedup": 2.0}, {"knob": 0.3, "error": "boom"}]}
    values = [0.1, {"k": 2, "t": 1}, 0.3, 0.5]
    assert peers.missing_values(values, have) == [0.1, 0.5]
    assert peers.missing_values(values, None) == values
    new = {"points": [{"knob": 0.5, "speedup": 4.0}, {"knob": 0.1, "speedup": 1.5}], "error": None}
    merged = peers.merge_results(have, new, values)
    assert [p["knob"] for p in merged["points"]] == [0.1, {"t": 1, "k": 2}, 0.3, 0.5]
    assert merged["error"] is None and merged["prepare_s"] == 3.0
    aligned = peers.aligned_points(values, merged)
    assert [p.get("speedup") for p in aligned] == [1.5, 2.0, None, 4.0]
    failed = peers.merge_results({"points": []}, {"points": [], "error": "ImportError: x"}, values)
    assert failed["error"] == "ImportError: x"
