"""ditfx.tune on the digits pipeline across guidance scales and step counts: the tuned configuration against the
best hand-picked one of docs/benchmarks.md, and the tuning runs the defaults of AdaptiveGuidance, StaticCache and
DynamicCache are chosen from.

Per setting (guidance scale : steps), three studies on calibration seeds 100 and 101, checked on held-out seeds 200
and 201 (100 digits each, 10 per class):

* the full space (static cache together+linear, Adaptive Guidance with its fade a choice, token budget) inside
  the standard budget: PSNR >= 30 dB, digits-FD within 10 %, accuracy within one point; its single-knob limits are
  the StaticCache and AdaptiveGuidance values the defaults come from;
* DynamicCache alone (its defaults but the threshold), same budget: its threshold limit;
* Adaptive Guidance alone inside its own check's budget (digits-FD within 5 %, accuracy within one point).

Then the tuned configuration and the hand-picked one (TokenBudget(flops=0.7) + StaticCache(0.7, together, linear)
+ AdaptiveGuidance(0.99)) run on report seeds 300 and 301 against the reference: quality, FLOPs, and wall time in
interleaved rounds (compiler eager for both, compilation excluded).

    python benchmarks/tune_digits.py --settings 1.5:50 4:50 1.5:25 4:25 1.5:20 4:20 --workdir out/tune \
        --json out/tune_digits.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from reporting import write_json  # benchmarks/reporting.py, beside this script

import ditfx
from ditfx.models import digits
from ditfx.models.digits.calibrate import SCHEDULE_FILE, shipped_file
from ditfx.tuning import QualityBudget, techniques
from ditfx.tuning.metrics import measure
from ditfx.tuning.study import Candidates, _finite, _run_cases

CALIBRATION, HELD_OUT, REPORT = [100, 101], [200, 201], [300, 301]


def hand_picked() -> ditfx.Config:
    """The fastest configuration inside the budget in docs/benchmarks.md (guidance 1.5, 50 steps)."""
    return ditfx.Config(cache=ditfx.StaticCache(0.7, shipped_file(SCHEDULE_FILE), per_block=False, forecast="linear"),
                        guidance=ditfx.AdaptiveGuidance(0.99, fill="delta"),
                        budget=ditfx.TokenBudget(adapter=digits.budget_adapter(), flops=0.7), compiler="eager")


def study(name, pipe, run, budget, space, workdir, timing):
    start = time.perf_counter()
    config = ditfx.tune(pipe, run, budget, space=space, calibration=CALIBRATION, held_out=HELD_OUT,
                        compiler="eager", workdir=workdir / name, timing=timing)
    t = config.tuning
    print(f"{name}: {config!r} ({t['evaluations']} points, {time.perf_counter() - start:.0f} s)", flush=True)
    return config, {"config": repr(config), "chosen": t["chosen"], "limits": t["limits"],
                    "evaluations": t["evaluations"], "seconds": t["seconds"], "closest_miss": t.get("closest_miss")}


def compare(pipe, run, budget, configs: dict, rounds: int) -> dict:
    """Each config on the report seed: quality and FLOPs against the reference, wall time in interleaved rounds."""
    candidates = Candidates(pipe)
    reference, _ = _run_cases(run, pipe, REPORT, marked=False)
    ref_measures = measure(reference, reference, budget.metric)
    targets, out = {}, {}
    for name, config in configs.items():
        target = ditfx.optimize(candidates.fresh(), config)
        outputs, _ = _run_cases(run, target, REPORT, marked=True)  # compiles
        s = ditfx.stats(target)
        m = measure(outputs, reference, budget.metric)
        out[name] = {"config": repr(config), "measures": m, "inside": budget.inside(m, ref_measures),
                     "flops": s.flops, "nfe": s.nfe / max(s.generations, 1), "wall": []}
        targets[name] = target
    walls = {"reference": []}
    for _ in range(rounds):
        walls["reference"].append(_run_cases(run, pipe, REPORT, marked=False)[1])
        for name, target in targets.items():
            out[name]["wall"].append(_run_cases(run, target, REPORT, marked=True)[1])
    exact = ditfx.optimize(candidates.fresh(), ditfx.Config(compiler="eager"))
    _run_cases(run, exact, REPORT, marked=True)
    ref_flops = ditfx.stats(exact).flops
    ref_wall = sorted(walls["reference"])[rounds // 2]
    for r in out.values():
        r["flops_speedup"] = ref_flops / r["flops"]
        r["wall_speedup"] = ref_wall / sorted(r["wall"])[rounds // 2]
    return {"reference": {"measures": ref_measures, "wall": walls["reference"], "flops": ref_flops}, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["1.5:50", "4:50", "1.5:25", "4:25"],
                   help="guidance_scale:steps pairs")
    p.add_argument("--workdir", type=Path, default=Path("out/tune"))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3, help="interleaved wall-time rounds of the comparison")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=("dynamic", "guidance", "compare"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"command": "python benchmarks/tune_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "calibration": CALIBRATION, "held_out": HELD_OUT, "report": REPORT,
              "settings": {}}
    for setting in args.settings:
        scale, steps = setting.split(":")
        run = digits.TuningRun(guidance_scale=float(scale), steps=int(steps), per_class=10)
        pipe = digits.pipeline()
        workdir = args.workdir / setting.replace(":", "_")
        standard = QualityBudget(psnr=30, fd=0.10, accuracy=0.01, metric=run.metric)
        entry = {}
        tuned, entry["full"] = study("full", pipe, run, standard, digits.tuning_space(run), workdir, timing=1)
        if "dynamic" not in args.skip:
            _, entry["dynamic"] = study("dynamic", pipe, run, standard,
                                        techniques(cache="dynamic", guidance=False), workdir, timing=0)
        if "guidance" not in args.skip and run.guidance_scale > 1:
            ag_budget = QualityBudget(psnr=None, fd=0.05, accuracy=0.01, metric=run.metric)
            _, entry["guidance"] = study("guidance", pipe, run, ag_budget,
                                         digits.tuning_space(run, cache=None, budget=False), workdir, timing=0)
        if "compare" not in args.skip:
            kept = workdir / "compare.json"  # a resumed run keeps its measured comparison
            if kept.is_file() and json.loads(kept.read_text())["tuned"]["config"] == repr(tuned):
                entry["compare"] = json.loads(kept.read_text())
            else:
                entry["compare"] = compare(pipe, run, standard, {"tuned": tuned, "hand_picked": hand_picked()},
                                           args.rounds)
                kept.write_text(json.dumps(_finite(entry["compare"]), indent=1))
            c = entry["compare"]
            print(f"{setting}: tuned {c['tuned']['wall_speedup']:.2f}x wall ({c['tuned']['flops_speedup']:.2f}x "
                  f"FLOPs, inside {c['tuned']['inside']}), hand-picked {c['hand_picked']['wall_speedup']:.2f}x "
                  f"({c['hand_picked']['flops_speedup']:.2f}x FLOPs, inside {c['hand_picked']['inside']})",
                  flush=True)
        report["settings"][setting] = entry
        report["defaults"] = defaults(report["settings"])
        write_json(_finite(report), str(args.json))
    print(json.dumps(report["defaults"], indent=1))
    return 0


def defaults(settings: dict) -> dict:
    """Each technique's default: its most aggressive value inside the budget at every setting (the least aggressive
    of the per-setting limits); for Adaptive Guidance per fade, then the fade whose common gamma is lowest."""
    out = {}
    delta = {s: e["full"]["limits"][next(iter(e["full"]["limits"]))]["limits"].get("delta")
             for s, e in settings.items()}
    out["StaticCache.delta"] = {"per_setting": delta, "default": min(delta.values())}
    if all("dynamic" in e for e in settings.values()):
        threshold = {s: e["dynamic"]["limits"]["dynamic"]["limits"]["threshold"] for s, e in settings.items()}
        out["DynamicCache.threshold"] = {"per_setting": threshold, "default": min(threshold.values())}
    guided = {s: e["guidance"]["limits"]["guidance"]["variants"] for s, e in settings.items() if "guidance" in e}
    if guided:
        fades = {}
        for variants in guided.values():
            for name, limits in variants.items():
                fades.setdefault(name, []).append(limits["gamma"])
        common = {name: max(gammas) for name, gammas in fades.items()}  # gamma nearer 1 is less aggressive
        best = min(common, key=lambda name: (common[name], name))
        out["AdaptiveGuidance"] = {"per_setting": guided, "gamma_at_every_setting": common, "default": best}
    return out


if __name__ == "__main__":
    sys.exit(main())
