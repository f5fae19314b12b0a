"""Guidance skipping on the digits pipeline: Adaptive Guidance over a gamma sweep (fill "cond" and "delta"),
LinearAG, a static window at AG's NFE, each alone and with block caching, against full CFG from the same seeds.

For every setting: network evaluations (NFE per sample), wall time of the generation (compilation excluded: a
first, identical generation compiles every batch size the setting uses and is reported as ``compile_s``),
speed-up over eager full CFG, and digits-FD, class accuracy, PSNR/SSIM against eager full CFG. Also writes the
per-step cosine of the conditional and unconditional predictions (a PNG next to the JSON).

    python benchmarks/guidance.py --json out/guidance.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from reporting import write_json  # benchmarks/reporting.py, beside this script

import ditfx
from ditfx.models import digits
from ditfx.models.digits.calibrate import LINEAR_AG_FILE, SCHEDULE_FILE, shipped_file
from ditfx.models.digits.sampling import class_grid, generate

GAMMAS = (0.99, 0.995, 0.997)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_setting(config, labels, args) -> tuple[torch.Tensor, dict]:
    """One compiled setting: a warm-up generation (compiles), then the timed one; images and stats."""
    pipe = digits.pipeline()
    ditfx.optimize(pipe, config)
    gen = lambda: generate(pipe.transformer, labels, args.steps, args.guidance_scale, args.seed)  # noqa: E731
    with ditfx.generation(pipe):
        _, warm = timed(gen)
    ditfx.reset_stats(pipe)
    with ditfx.generation(pipe):
        images, wall = timed(gen)
    s = ditfx.stats(pipe)
    torch._dynamo.reset()
    return images, {"wall_s": wall, "compile_s": max(0.0, warm - wall), "nfe": s.nfe, "steps": s.steps,
                    "calls": s.calls, "block_evals": s.block_evals, "block_evals_skipped": s.block_evals_skipped,
                    "flops": s.flops, "recompiles": s.recompiles, "graph_breaks": s.graph_breaks,
                    "cosines": ditfx.guidance_trace(pipe) if isinstance(config.guidance, ditfx.AdaptiveGuidance)
                    else None}


def plot_cosines(trace: list[list[float]], gamma: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.array(trace)  # (steps, samples)
    steps = np.arange(len(a))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(steps, np.nanpercentile(a, 5, axis=1), np.nanpercentile(a, 95, axis=1), alpha=0.3,
                    label="5-95 % of samples")
    ax.plot(steps, np.nanmedian(a, axis=1), label="median")
    ax.axhline(gamma, color="k", ls="--", lw=1, label=f"default gamma {gamma}")
    ax.set_xlabel("step (50-step Euler, full CFG)")
    ax.set_ylabel("cos(cond, uncond)")
    ax.set_title("Digits DiT: cosine of conditional and unconditional predictions")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The digits generation every guidance benchmark samples: samples per class, steps, scale, seed."""
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sampling_arguments(p)
    p.add_argument("--delta", type=float, default=0.5,
                   help="StaticCache delta of the combined settings (blocks together, linear forecast)")
    p.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    p.add_argument("--compiler", default="inductor")
    p.add_argument("--check-only", action="store_true",
                   help="only the issue's check: AdaptiveGuidance() as shipped, and the paper's fill at its gamma")
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    labels = class_grid(args.per_class)
    default_gamma = ditfx.AdaptiveGuidance().gamma
    cache = ditfx.StaticCache(args.delta, shipped_file(SCHEDULE_FILE), per_block=False, forecast="linear")
    linear = ditfx.LinearAG(shipped_file(LINEAR_AG_FILE))

    def config(guidance=None, with_cache=False):
        return ditfx.Config(guidance=guidance, cache=cache if with_cache else None, compiler=args.compiler)

    baseline_model = digits.load_transformer()
    reference, eager_s = timed(lambda: generate(baseline_model, labels, args.steps, args.guidance_scale, args.seed))
    base_q = digits.metrics(reference, labels)
    print(f"eager CFG: {eager_s:.1f} s, fd {base_q['fd']:.1f}, accuracy {base_q['accuracy']:.3f}", file=sys.stderr)

    if args.check_only:
        return check_only(args, labels, reference, base_q, eager_s, config)
    # full CFG through AdaptiveGuidance(gamma=1): never switches, and records the cosine curve
    settings = [("cfg", None, config(ditfx.AdaptiveGuidance(1.0)))]
    settings += [("ag", g, config(ditfx.AdaptiveGuidance(g, fill="cond"))) for g in args.gammas]
    settings += [("ag_delta", g, config(ditfx.AdaptiveGuidance(g, fill="delta"))) for g in args.gammas]
    settings += [("linear_ag", None, config(linear))]
    points = []
    for name, knob, cfg in settings:
        images, run = run_setting(cfg, labels, args)
        points.append(point(name, knob, images, run, labels, reference, eager_s))
    ag_default = next((q for q in points if q["method"] == "ag" and q["knob"] == default_gamma), None)
    if ag_default is not None:  # a static window with AG's NFE: guidance on the first k steps
        k = round(ag_default["nfe"] - args.steps)
        window = ditfx.GuidanceWindow(0.0, k / args.steps)
        images, run = run_setting(config(window), labels, args)
        points.append(point("window", k / args.steps, images, run, labels, reference, eager_s))
        settings.append(("window", k / args.steps, config(window)))
    for name, knob, cfg in list(settings):
        if name in ("ag", "ag_delta") and knob != default_gamma:
            continue
        images, run = run_setting(config(cfg.guidance, with_cache=True), labels, args)
        points.append(point(f"{name}+cache", knob, images, run, labels, reference, eager_s))

    full_trace = points[0]["cosines"]
    for q in points:
        q.pop("cosines", None)
    report = {"benchmark": "guidance", "settings": vars(args), "default_gamma": default_gamma,
              "baseline": {"method": "eager CFG", "wall_s": eager_s, **base_q},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
              "points": points, "cosine_median": [float(torch.tensor(r).nanmedian()) for r in full_trace],
              "default_check": default_check(points, base_q, args.steps)}
    print_table(report)
    write_json(report, args.json)
    if args.json and args.json != "-":
        plot_cosines(full_trace, default_gamma, Path(args.json).with_suffix(".png"))
    return report


def check_only(args, labels, reference, base_q, eager_s, config) -> dict:
    """AdaptiveGuidance at the default gamma with both fills, and the check on the shipped default."""
    gamma = ditfx.AdaptiveGuidance().gamma
    points = []
    for name, fill in (("ag", "cond"), ("ag_delta", "delta")):
        images, run = run_setting(config(ditfx.AdaptiveGuidance(gamma, fill=fill)), labels, args)
        run.pop("cosines")
        points.append(point(name, gamma, images, run, labels, reference, eager_s))
    report = {"benchmark": "guidance (check only)", "settings": vars(args), "default_gamma": gamma,
              "baseline": {"method": "eager CFG", "wall_s": eager_s, **base_q}, "points": points,
              "default_check": default_check(points, base_q, args.steps)}
    print_table(report)
    write_json(report, args.json)
    return report


def default_check(points: list[dict], base: dict, steps: int) -> dict | None:
    """The issue's check on ``AdaptiveGuidance()`` as shipped: at least 20 % fewer network evaluations than
    full CFG, digits-FD within 5 % and class accuracy within one point of eager full CFG."""
    default = ditfx.AdaptiveGuidance()
    method = {"cond": "ag", "delta": "ag_delta"}[default.fill]
    q = next((q for q in points if q["method"] == method and q["knob"] == default.gamma), None)
    if q is None:
        return None
    saved = 1 - q["nfe"] / (2 * steps)
    fd_change = q["fd"] / base["fd"] - 1
    accuracy_change = q["accuracy"] - base["accuracy"]
    return {"setting": f"AdaptiveGuidance(gamma={default.gamma}, fill={default.fill!r})", "nfe_saved": saved,
            "fd_change": fd_change, "accuracy_change": accuracy_change,
            "met": saved >= 0.2 and abs(fd_change) <= 0.05 and accuracy_change >= -0.01 - 1e-9}


def point(name, knob, images, run, labels, reference, eager_s) -> dict:
    q = digits.metrics(images, labels, reference=reference)
    row = {"method": name, "knob": knob, **run, "speedup": eager_s / run["wall_s"], **q}
    print(f"{name:<16} {str(knob):<8} nfe {row['nfe']:6.2f}  wall {row['wall_s']:6.1f} s  x{row['speedup']:.2f}  "
          f"fd {q['fd']:7.1f}  acc {q['accuracy']:.3f}  psnr {q['psnr']:5.1f}", file=sys.stderr)
    return row


def print_table(report: dict) -> None:
    base = report["baseline"]
    print(f"\n{'method':<16}{'knob':>8}{'NFE':>8}{'wall s':>8}{'speed-up':>9}{'FD':>8}{'acc %':>7}{'PSNR':>7}",
          file=sys.stderr)
    print(f"{'eager CFG':<16}{'':>8}{2 * report['settings']['steps']:>8}{base['wall_s']:>8.1f}{1.0:>8.2f}x"
          f"{base['fd']:>8.1f}{100 * base['accuracy']:>7.1f}{'-':>7}", file=sys.stderr)
    for q in report["points"]:
        knob = "" if q["knob"] is None else f"{q['knob']:.3g}"
        print(f"{q['method']:<16}{knob:>8}{q['nfe']:>8.1f}{q['wall_s']:>8.1f}{q['speedup']:>8.2f}x{q['fd']:>8.1f}"
              f"{100 * q['accuracy']:>7.1f}{q['psnr']:>7.1f}", file=sys.stderr)
    check = report["default_check"]
    if check is not None:
        print(f"\n{check['setting']}: {100 * check['nfe_saved']:.1f} % fewer evaluations, digits-FD "
              f"{100 * check['fd_change']:+.1f} %, accuracy {100 * check['accuracy_change']:+.1f} points: "
              f"{'met' if check['met'] else 'NOT met'} (>= 20 %, within 5 %, within one point)", file=sys.stderr)


if __name__ == "__main__":
    main()
