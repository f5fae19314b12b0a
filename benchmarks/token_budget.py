"""Token budgets (FlexiDiT) on the digits pipeline: FLOPs against digits-FD, class accuracy and PSNR.

For each sampling setting (guidance scale, step count) and the same seeds: the uncompressed pipeline (eager, the
quality reference), ditfx without a budget (the speed reference), and token budgets at several FLOPs fractions:
weak-early (the first steps weak, FlexiDiT's schedule) with the shipped distilled adapter and with the zero-shot
mode, weak-late at the same FLOPs (the last steps weak), and the calibrated schedule (the steps with the
smallest measured weak/native gap). FLOPs are the cost model's, counted by ``ditfx.stats``; quality points run
with the eager inner backend (one generation each). Wall time, for the first setting: the median of interleaved
rounds of Inductor-compiled ditfx with and without the budget (weak-early, distilled), so the realized speed-up
can be set against the FLOPs ratio.

    python benchmarks/token_budget.py --json docs/results/token_budget.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from reporting import write_json  # benchmarks/reporting.py, beside this script

import ditfx
from ditfx.budget import BudgetSchedule
from ditfx.models import digits
from ditfx.models.digits.sampling import class_grid

FLOPS = (0.8, 0.7, 0.6, 0.5)


def make_pipe(config):
    pipe = digits.pipeline()
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        ditfx.optimize(pipe, config)
    return pipe


def sample(pipe, labels, steps, scale, seed) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = pipe(labels, num_inference_steps=steps, guidance_scale=scale,
                  generator=torch.Generator().manual_seed(seed)).images
    return images, time.perf_counter() - start


def late_schedule(steps: int, ratio: float, flops: float) -> BudgetSchedule:
    """The last steps weak, as many as the same FLOPs budget makes the first ones weak."""
    from ditfx.budget.schedule import weak_steps_for

    k = weak_steps_for(steps, ratio, flops)
    times = [1 - i / steps for i in range(steps)]
    return BudgetSchedule(times, [0.0] * steps, ratio, [i >= steps - k for i in range(steps)], flops)


def run_point(name, knob, config, labels, args, reference, scale, steps) -> dict:
    pipe = make_pipe(config)
    images, wall = sample(pipe, labels, steps, scale, args.seed)
    s = ditfx.stats(pipe)
    q = digits.metrics(images, labels, reference=reference)
    row = {"method": name, "knob": knob, "wall_s": wall, "flops": s.flops, "modes": s.modes,
           "recompiles": s.recompiles, "graph_breaks": s.graph_breaks, **q}
    torch._dynamo.reset()
    return row


def timed_rounds(configs: dict, labels, args, scale, steps) -> dict:
    """Median wall time of each config over interleaved rounds (compiled once, before the rounds)."""
    pipes = {name: make_pipe(cfg) for name, cfg in configs.items()}
    for pipe in pipes.values():
        sample(pipe, labels, steps, scale, args.seed)
    times = {name: [] for name in pipes}
    for _ in range(args.rounds):
        for name, pipe in pipes.items():
            times[name].append(sample(pipe, labels, steps, scale, args.seed)[1])
    torch._dynamo.reset()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--settings", nargs="+", default=["1.5x50", "4.0x50", "1.5x25"],
                   help="guidance scale x steps")
    p.add_argument("--flops", type=float, nargs="+", default=list(FLOPS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (0: no timing)")
    p.add_argument("--compiler", default="inductor", help="inner backend of the timed rounds")
    p.add_argument("--adapter", help="a budget adapter file (default: the shipped digits adapter)")
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    labels = class_grid(args.per_class)
    adapter = ditfx.budget.BudgetAdapter.load(args.adapter) if args.adapter else digits.budget_adapter()
    report = {"benchmark": "token_budget", "settings": vars(args), "adapter": adapter.record,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}, "results": []}

    def config(compiler="eager", **budget):
        return ditfx.Config(compiler=compiler, budget=ditfx.TokenBudget(**budget) if budget else None)

    for setting in args.settings:
        scale, steps = float(setting.split("x")[0]), int(setting.split("x")[1])
        reference, eager_s = sample(make_pipe(None), labels, steps, scale, args.seed)
        base = digits.metrics(reference, labels)
        print(f"[{setting}] eager: {eager_s:.1f} s, fd {base['fd']:.1f}, acc {base['accuracy']:.3f}", file=sys.stderr)
        gaps = ditfx.budget.calibrate(make_pipe(None), lambda pipe, steps=steps, scale=scale: pipe(
            class_grid(2), num_inference_steps=steps, guidance_scale=scale,
            generator=torch.Generator().manual_seed(1000)), adapter=adapter, generations=1, progress=None)
        points = [run_point("native", None, config(), labels, args, reference, scale, steps)]
        native_flops = points[0]["flops"]
        for f in args.flops:
            points.append(run_point("distilled early", f, config(adapter=adapter, flops=f), labels, args, reference,
                                    scale, steps))
            points.append(run_point("distilled late", f, config(adapter=adapter, calibrated=late_schedule(
                steps, gaps.flops_ratio, f)), labels, args, reference, scale, steps))
            points.append(run_point("distilled calibrated", f, config(adapter=adapter, calibrated=gaps, flops=f),
                                    labels, args, reference, scale, steps))
            points.append(run_point("zero-shot early", f, config(flops=f), labels, args, reference, scale, steps))
        for q in points:
            q["flops_fraction"] = q["flops"] / native_flops
            print(f"  {q['method']:<22}{str(q['knob']):<6} flops {q['flops_fraction']:.3f}  fd {q['fd']:7.1f}  "
                  f"acc {q['accuracy']:.3f}  psnr {q['psnr']:5.1f}", file=sys.stderr)
        timing, speed = None, None
        if setting == args.settings[0] and args.rounds > 0:
            timing = timed_rounds({"native": config(args.compiler), **{
                f"early {f}": config(args.compiler, adapter=adapter, flops=f) for f in args.flops}},
                labels, args, scale, steps)
            speed = [{"flops": f, "flops_ratio": native_flops / next(q["flops"] for q in points
                                                                     if q["method"] == "distilled early"
                                                                     and q["knob"] == f),
                      "speedup": timing["native"] / timing[f"early {f}"]} for f in args.flops]
            for s in speed:
                s["realized"] = s["speedup"] / s["flops_ratio"]
                print(f"  early {s['flops']}: FLOPs ratio {s['flops_ratio']:.2f}x, wall {s['speedup']:.2f}x "
                      f"({s['realized']:.2f} of it)", file=sys.stderr)
        report["results"].append({"guidance_scale": scale, "steps": steps, "eager_s": eager_s, "baseline": base,
                                  "gaps": {"times": gaps.times, "gaps": gaps.gaps, "flops_ratio": gaps.flops_ratio},
                                  "points": points, "timing_s": timing, "speed": speed})
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
