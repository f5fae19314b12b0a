"""The ``ditfx`` command: ``demo`` (the main job), ``inspect`` (regions, costs, plan), ``calibrate`` (schedules),
``export`` and ``rebuild`` (packages that ``ditfx.load`` runs), ``tune`` (the fastest config in a quality
budget)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_HELP = ("a reference DiT config (DiT-S/2, DiT-XL/2, ..., DiT-T/2 for a tiny one) or tiny:<family> "
              "for a tiny random diffusers model (tiny:dit, tiny:pixart, tiny:sd3, tiny:flux, tiny:wan, tiny:sana, "
              "tiny:auraflow, tiny:cogview4, tiny:qwenimage, tiny:chroma, tiny:hunyuan, tiny:ltx), or digits "
              "(the shipped, trained digits DiT)")


def _cache_config(args):
    from ditfx.cache.config import DynamicCache, StaticCache

    if getattr(args, "schedule", None):
        return StaticCache(delta=args.delta, schedule=args.schedule, per_block=args.per_block,
                                 forecast=args.forecast or "linear")
    if getattr(args, "threshold", None) is not None:
        return DynamicCache(threshold=args.threshold, forecast=args.forecast or "none")
    return None


def _budget_config(args):
    from ditfx.budget.config import TokenBudget

    until, flops, adapter = (getattr(args, k, None) for k in ("budget_until", "budget_flops", "adapter"))
    if until is None and flops is None:
        if adapter is not None:
            raise ValueError("--adapter needs --budget-until or --budget-flops")
        return None
    if adapter == "digits":
        from ditfx.models.digits import budget_adapter

        adapter = budget_adapter()
    return TokenBudget(adapter=adapter, weak_until=until, flops=flops, patch_size=args.patch)


def cmd_inspect(args) -> int:
    from ditfx.config import Config
    from ditfx.inspect import format_dot, format_text, inspect_model
    from ditfx.models import zoo

    named = zoo.load(args.model, batch=args.batch)
    kernels = args.kernels or args.kernel_source is not None
    config = Config(cache=_cache_config(args), compiler="eager", kernels=kernels, budget=_budget_config(args))
    report = inspect_model(args.model, named, config, args.steps)
    if args.kernel_source is not None:
        from ditfx.inspect.kernels import kernel_source

        print(kernel_source(report["kernels"], args.kernel_source))
        return 0
    if args.dot:
        Path(args.dot).write_text(format_dot(report))
        print(f"wrote {args.dot} (render: dot -Tpng {args.dot} -o regions.png)", file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else format_text(report))
    return 0


def cmd_calibrate(args) -> int:
    if args.budget:
        return cmd_calibrate_budget(args)
    from tqdm import tqdm

    from ditfx.cache.calibration import calibrate
    from ditfx.models import zoo

    named = zoo.load(args.model, batch=args.batch)
    total = args.generations * args.steps
    with tqdm(total=total, desc="calibrating", unit="step", file=sys.stderr) as bar:
        def one_generation(model):
            zoo.run_loop(named, model, steps=args.steps, progress=lambda k: bar.update(1))

        schedule = calibrate(named.model, one_generation, generations=args.generations, mode=args.mode)
    out = schedule.save(args.out)
    png = schedule.heatmap(out.with_suffix(".png"), args.delta, per_block=args.per_block)
    plan = schedule.plan(args.delta, per_block=args.per_block)
    evals, full = sum(map(sum, plan)), len(plan) * len(plan[0])
    print(f"wrote {out} and {png}: at delta {args.delta}, {evals}/{full} block evaluations "
          f"({1 - evals / full:.0%} skipped)")
    return 0


def cmd_calibrate_budget(args) -> int:
    import torch

    from ditfx.budget.adapter import BudgetAdapter
    from ditfx.budget.calibration import calibrate
    from ditfx.models import zoo

    adapter = args.adapter
    if adapter == "digits":
        from ditfx.models.digits import budget_adapter

        adapter = budget_adapter()
    elif adapter is not None:
        adapter = BudgetAdapter.load(adapter)
    if args.model == "digits":  # the pipeline as users run it: guidance, the scheduler's steps
        from ditfx.models.digits import pipeline

        target = pipeline()
        target.set_progress_bar_config(disable=True)

        def run(pipe):
            labels = torch.randint(10, (args.batch,)).tolist()
            pipe(labels, guidance_scale=args.scale, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,)))))
        time_scale = 1000.0
    else:
        named = zoo.load(args.model, batch=args.batch)
        target, time_scale = named.model, named.time_scale

        def run(model):
            zoo.run_loop(named, model, steps=args.steps)
    schedule = calibrate(target, run, adapter=adapter, patch_size=args.patch, generations=args.generations,
                         time_scale=time_scale, progress=lambda msg: print(msg, file=sys.stderr))
    if args.flops is not None:
        schedule = schedule.choose(args.flops)
    out = schedule.save(args.out)
    png = schedule.plot(out.with_suffix(".png"))
    weak = sum(schedule.weak) if schedule.weak else 0
    print(f"wrote {out} and {png}: {len(schedule.times)} steps, weak/native FLOPs {schedule.flops_ratio:.3f}"
          + (f", {weak} weak steps at flops {args.flops}" if args.flops is not None else ""))
    return 0


def cmd_export(args) -> int:
    from ditfx.config import Config
    from ditfx.guidance.config import AdaptiveGuidance
    from ditfx.models import zoo
    from ditfx.package.build import export

    if args.demo:
        if args.model != "digits":
            raise ValueError("--demo exports the digits model with the demo's config: use MODEL digits")
        from ditfx.demo import DemoSettings, demo_config

        settings = DemoSettings(per_class=args.per_class)
        config = demo_config(settings)
        batch = 10 * settings.per_class * (2 if settings.guidance_scale > 1 else 1)
    else:
        if args.batch < 1:
            raise ValueError(f"--batch must be at least 1 (the rows of the example call the package serves), got "
                             f"{args.batch}")
        guidance = AdaptiveGuidance(args.gamma, fill=args.fill) if args.gamma is not None else None
        config = Config(cache=_cache_config(args), guidance=guidance)
        batch = args.batch
    named = zoo.load(args.model, batch=batch)
    inputs = {**named.inputs, **({"return_dict": False} if named.diffusers else {})}
    path = export(named.model, args.path, example_inputs=inputs, config=config, overwrite=args.overwrite,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    manifest = json.loads((path / "manifest.json").read_text())
    summary = {"path": str(path), "model": args.model, "batch": batch, "config": manifest["config"],
               "build_seconds": manifest["build_seconds"], "artifacts": sum(1 for f in manifest["files"]
                                                                            if f.startswith("artifacts/")),
               "bytes": sum(f["bytes"] for f in manifest["files"].values()), "device": manifest["device"],
               "arch": manifest["arch"], "torch": manifest["torch"]}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"wrote {path}: {summary['artifacts']} compiled artifacts, {summary['bytes'] / 1e6:.1f} MB, built in "
              f"{summary['build_seconds']:.0f} s for {summary['device']} ({summary['arch']}), torch "
              f"{summary['torch']}. Load it with ditfx.load({str(path)!r})")
    return 0


def cmd_rebuild(args) -> int:
    from ditfx.package.build import rebuild

    path = rebuild(args.package, args.path, device=args.device, overwrite=args.overwrite,
                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {path}")
    return 0


def cmd_tune(args) -> int:
    import dataclasses

    import torch

    from ditfx.cache.calibration import calibrate
    from ditfx.tuning import QualityBudget, plot
    from ditfx.tuning.study import tune

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "digits":
        from ditfx.models import digits

        run = digits.TuningRun(guidance_scale=args.guidance_scale, steps=args.steps, per_class=args.per_class)
        target = digits.pipeline()
        # the digits model measures FD and accuracy: the standard budget bounds them unless told otherwise
        budget = QualityBudget(psnr=args.psnr, ssim=args.ssim, fd=0.10 if args.fd is None else args.fd,
                               accuracy=0.01 if args.accuracy is None else args.accuracy, metric=run.metric)
        space = digits.tuning_space(run, cache=args.cache if "cache" in args.techniques else None,
                                    guidance="guidance" in args.techniques, budget="budget" in args.techniques)
        label = repr(run)
    else:
        if args.fd is not None or args.accuracy is not None:
            raise ValueError("--fd and --accuracy are measured on the digits model only; for MODEL use --psnr/--ssim")
        from ditfx.models import zoo
        from ditfx.tuning import techniques
        from ditfx.tuning.study import Candidates

        named = zoo.load(args.model, batch=args.batch)
        target = named.model

        def run(model, seed):
            x = named.inputs[named.latents]
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=x.dtype)
            loop = dataclasses.replace(named, inputs={**named.inputs, named.latents: noise})
            return zoo.run_loop(loop, model, steps=args.steps)

        budget = QualityBudget(psnr=args.psnr, ssim=args.ssim)
        if args.cache == "static":
            candidates = Candidates(target)
            schedule = calibrate(candidates.fresh_module(), lambda m: run(m, args.calibration_seeds[0]),
                                       generations=1)
            space = techniques(cache="static", schedule=schedule, guidance=False)
        else:
            space = techniques(cache="dynamic", guidance=False)
        label = f"{args.model} batch {args.batch} steps {args.steps}"
    config = tune(target, run, budget, space=space, calibration=args.calibration_seeds,
                        held_out=args.held_out_seeds, compiler=args.compiler, workdir=args.workdir,
                        timing=args.timing_rounds, out=args.out, label=label, margin=args.margin)
    report = {"model": args.model, "config": repr(config), "out": args.out, **config.tuning}
    if args.plot:
        plot.pareto(config.tuning, args.plot)
        report["plot"] = args.plot
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    chosen = config.tuning["chosen"]
    if chosen is None:
        print(f"{config.tuning['message']}: {config!r}")
    else:
        held = chosen["held_out"]["measures"]
        print(f"tuned: {config!r}\n  {chosen['speed']:.2f}x fewer FLOPs"
              + (f", {chosen['wall_speedup']:.2f}x wall" if "wall_speedup" in chosen else "")
              + " than the reference; held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in held.items()))
    if args.out:
        print(f"wrote {args.out} (ditfx.Config.load reads it)")
    return 0


def cmd_demo(args) -> int:
    from ditfx.demo import main as demo_main

    return demo_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditfx", description="Compiler passes that make DiT inference fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    from ditfx.demo import add_arguments as add_demo_arguments

    p = sub.add_parser("demo", help="sample the shipped digits DiT with and without ditfx; PNG and table")
    add_demo_arguments(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("inspect", help="show the region map, FLOPs, passes and per-step plan of a model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="steps of the plan shown")
    p.add_argument("--threshold", type=float, help="show a DynamicCache with this threshold")
    p.add_argument("--schedule", help="show a StaticCache with this schedule JSON (from ditfx calibrate)")
    p.add_argument("--delta", type=float, default=0.1, help="StaticCache delta (with --schedule)")
    p.add_argument("--per-block", action="store_true",
                   help="StaticCache(per_block=True): each block on its own schedule, the paper's rule (with "
                        "--schedule; default: the blocks recompute together)")
    p.add_argument("--forecast", choices=("none", "linear"),
                   help="how reused values are forecast (with --schedule: default linear; --threshold: none)")
    p.add_argument("--budget-until", type=float, help="show a TokenBudget(weak_until=...): the per-step patch size")
    p.add_argument("--budget-flops", type=float, help="show a TokenBudget(flops=...): the per-step patch size")
    p.add_argument("--adapter", help="the budget adapter (.safetensors; 'digits': the shipped one); default zero-shot")
    p.add_argument("--patch", type=int, help="the zero-shot weak patch size (default twice the native)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dot", metavar="FILE", help="also write the region graph as Graphviz DOT")
    p.add_argument("--kernels", action="store_true",
                   help="run the kernel fusion pass (Config(kernels=True)) and list which nodes became which kernel")
    p.add_argument("--kernel-source", metavar="NAME",
                   help="print the Triton source of a kernel listed by --kernels (a unique name prefix will do)")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("export", help="write a package (plan, weights, AOTInductor artifacts) that ditfx.load runs "
                                      "without the model's code or a compiler")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("path", help="the package directory to write")
    p.add_argument("--batch", type=int, default=2, help="rows of the example call (a batched CFG call counts both)")
    p.add_argument("--threshold", type=float, help="DynamicCache with this threshold")
    p.add_argument("--schedule", help="StaticCache with this schedule JSON (from ditfx calibrate)")
    p.add_argument("--delta", type=float, default=0.1, help="StaticCache delta (with --schedule)")
    p.add_argument("--per-block", action="store_true",
                   help="StaticCache(per_block=True), the paper's rule (with --schedule; default: blocks together)")
    p.add_argument("--forecast", choices=("none", "linear"),
                   help="how reused values are forecast (with --schedule: default linear; --threshold: none)")
    p.add_argument("--gamma", type=float, help="AdaptiveGuidance with this gamma (the example batch is a CFG batch)")
    p.add_argument("--fill", choices=("cond", "delta"), default="delta", help="AdaptiveGuidance fill (with --gamma)")
    p.add_argument("--demo", action="store_true",
                   help="digits with the demo's config and batch, for `ditfx demo --package PATH`")
    p.add_argument("--per-class", type=int, default=8, help="(--demo) samples of each digit, as ditfx demo's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at PATH")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("rebuild", help="compile a package again from its exported programs, for this machine "
                                       "(another torch, device, GPU architecture or CPU ISA); no model code needed")
    p.add_argument("package", help="the package to rebuild")
    p.add_argument("path", help="the package directory to write")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the package's device type)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at PATH")
    p.set_defaults(run=cmd_rebuild)

    p = sub.add_parser("tune", help="find the fastest configuration inside a quality budget (ditfx.tune) and save it")
    p.add_argument("model", help=MODEL_HELP + "; digits has its FD and accuracy, other models PSNR/SSIM only")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="(digits) classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--per-class", type=int, default=20,
                   help="(digits) samples of each digit per seed (20: accuracy resolves 0.25 points over two seeds; "
                        "at 10 Adaptive Guidance's one-point bound at guidance 1.5 is two digits, docs/tune.md)")
    p.add_argument("--batch", type=int, default=2, help="(other models) batch of the sampling loop")
    p.add_argument("--calibration-seeds", type=int, nargs="+", default=[100, 101],
                   help="seeds the search runs on (two: digits-FD on one seed of 100 digits moves by several %%)")
    p.add_argument("--held-out-seeds", type=int, nargs="+", default=[200, 201],
                   help="seeds the chosen configuration is checked on (none shared with the calibration seeds)")
    p.add_argument("--psnr", type=float, default=30.0, help="lowest PSNR (dB) against the reference")
    p.add_argument("--ssim", type=float, help="lowest SSIM against the reference")
    p.add_argument("--fd", type=float, help="(digits) largest relative digits-FD change (default 0.10)")
    p.add_argument("--accuracy", type=float, help="(digits) largest class-accuracy drop (default 0.01: one point)")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static", help="the block cache searched")
    p.add_argument("--techniques", nargs="+", choices=("cache", "guidance", "budget"),
                   default=["cache", "guidance", "budget"],
                   help="(digits) what the search combines: the block cache, Adaptive Guidance, the token budget")
    p.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help="the compiler of the returned config (the search compiles with eager)")
    p.add_argument("--timing-rounds", type=int, default=1,
                   help="wall-clock rounds for the fastest points inside the budget (0: FLOPs decide)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="the share of each bound's allowance a point must leave unused on the held-out seeds")
    p.add_argument("--workdir", help="keep evaluations here; running again with it resumes")
    p.add_argument("--out", help="write the tuned config here (.json)")
    p.add_argument("--json", help="write the report (front, chosen point, held-out check) here")
    p.add_argument("--plot", help="write the Pareto plot here (.png)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(run=cmd_tune)

    p = sub.add_parser("calibrate", help="record per-block change curves and write a static cache schedule")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--delta", type=float, default=0.1, help="delta of the heatmap and the summary")
    p.add_argument("--per-block", action="store_true",
                   help="heatmap and summary for per_block=True (each block on its own; default: together)")
    p.add_argument("--mode", choices=("residual", "output"), default="residual")
    p.add_argument("--out", default="schedule.json")
    p.add_argument("--budget", action="store_true",
                   help="write a token-budget schedule instead: the weak/native prediction gap per step "
                        "(TokenBudget(calibrated=...)); with --adapter, --patch, --flops, --scale")
    p.add_argument("--adapter", help="(--budget) the budget adapter (.safetensors; 'digits': the shipped one); "
                                     "default zero-shot")
    p.add_argument("--patch", type=int, help="(--budget) the zero-shot weak patch size (default twice the native)")
    p.add_argument("--flops", type=float, help="(--budget) choose the weak steps for this fraction of the native FLOPs")
    p.add_argument("--scale", type=float, default=1.5, help="(--budget) guidance scale of the digits pipeline")
    p.set_defaults(run=cmd_calibrate)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ditfx {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
