"""Cold start: process start to first output, and the first call, for every way of running a DiT, in fresh
processes; then the steady generation of the loaded package against the optimized model, in one process.

Ways (each in its own fresh process, ``--repeats`` times, medians reported):

- ``eager``: the model as it is;
- ``compile``: ``torch.compile(model)`` (Inductor, the whole model);
- ``regional``: ``torch.compile`` of each repeated block (diffusers' ``compile_repeated_blocks``), cold cache;
- ``regional_warm``: the same with the cache directory an earlier run filled;
- ``ditfx``: ``ditfx.optimize(model, config)`` (Inductor), cold cache;
- ``ditfx_warm``: the same with the cache directory an earlier run filled (torch's FX-graph and AOTAutograd caches);
- ``package``: ``ditfx.load(path)`` of the package ``ditfx.export`` wrote for the same model and config.

"Cold" is a fresh copy of a cache directory that has seen one unrelated compile (Inductor's one-time CPU probe
and headers are a machine's cost, not a model's). The model is built from its config and the weights loaded from
a safetensors file, as a deployment would; the package needs neither the model's code nor its build.

    python benchmarks/cold_start.py --model DiT-S/2 --json docs/results/cold_start.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("eager", "compile", "regional", "regional_warm", "ditfx", "ditfx_warm", "package")
CACHE = "threshold 0.1"  # the config every ditfx way runs: ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1))


def config():
    import ditfx

    return ditfx.Config(cache=ditfx.DynamicCache(threshold=0.1))


# ------------------------------------------------------------------------------------------- the worker
def worker(args) -> None:
    """One way, one fresh process: prints a JSON line with its timings (wall clock since the epoch)."""
    marks = {"process": float(os.environ["COLD_START_SPAWNED"])}
    import torch

    torch.set_num_threads(args.threads)
    marks["torch"] = time.time()
    inputs = torch.load(args.inputs, weights_only=True)
    if args.worker == "package":
        import ditfx

        model = ditfx.load(args.package)
        marks["ready"] = time.time()
    else:
        from safetensors.torch import load_file

        import ditfx
        from ditfx.api import repeated_blocks
        from ditfx.models import zoo

        model = zoo.load(args.model, batch=1).model
        model.load_state_dict(load_file(args.weights))
        marks["built"] = time.time()
        if args.worker == "compile":
            model = torch.compile(model, dynamic=False)
        elif args.worker.startswith("regional"):
            for path in repeated_blocks(model):
                model.get_submodule(path).compile(fullgraph=True, dynamic=False)
        elif args.worker.startswith("ditfx"):
            model = ditfx.optimize(model, config())
        marks["ready"] = time.time()
    with torch.no_grad():
        start = time.perf_counter()
        out = model(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        first = time.perf_counter() - start
        marks["first_output"] = time.time()
        start = time.perf_counter()
        model(**inputs)
        second = time.perf_counter() - start
    modules = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
    print(json.dumps({"way": args.worker, "first_call_s": first, "second_call_s": second,
                      "start_to_first_output_s": marks["first_output"] - marks["process"],
                      "import_torch_s": marks["torch"] - marks["process"], "setup_s": marks["ready"] - marks["torch"],
                      "checksum": float(out.double().abs().sum()), "compiler_modules": modules}))


# ------------------------------------------------------------------------------------------- the driver
def spawn(args, way: str, cache_dir: Path, work: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, __file__, "--worker", way, "--model", args.model, "--threads", str(args.threads),
           "--inputs", str(work / "inputs.pt"), "--weights", str(work / "weights.safetensors"),
           "--package", str(work / "package")]
    env["COLD_START_SPAWNED"] = repr(time.time())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prime(cache: Path) -> None:
    """A cache directory that has seen one unrelated compile."""
    code = ("import torch; f = torch.compile(lambda x: (x * 2).sin()); f(torch.randn(8))")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
                   check=True, capture_output=True, timeout=600)


def steady(args, work: Path) -> dict:
    """Generations of ``--steps`` steps: the loaded package against the optimized model (and eager), interleaved
    rounds in this process, medians."""
    import torch
    from safetensors.torch import load_file

    import ditfx
    from ditfx.models import zoo

    torch.set_num_threads(args.threads)
    named = zoo.load(args.model, batch=args.batch)
    named.model.load_state_dict(load_file(str(work / "weights.safetensors")))
    models = {"eager": named.model, "ditfx": ditfx.optimize(named.model, config()),
              "package": ditfx.load(work / "package")}
    outputs, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():  # compiles the optimized model's variants; not timed
            outputs[name] = zoo.run_loop(named, model, steps=args.steps)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                zoo.run_loop(named, model, steps=args.steps)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    stats = {name: ditfx.stats(models[name]) for name in ("ditfx", "package")}
    return {"steps": args.steps, "rounds": args.rounds, "median_s": median, "all_s": times,
            "package_vs_optimized": median["package"] / median["ditfx"],
            "max_abs_diff_package_vs_optimized": float((outputs["package"] - outputs["ditfx"]).abs().max()),
            "block_evals": {name: s.block_evals for name, s in stats.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/2", help="a reference DiT config or tiny:<family> (ditfx.models.zoo)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per way")
    p.add_argument("--steps", type=int, default=10, help="steps of a steady generation")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of steady generations")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ",".join(WAYS))
    p.add_argument("--json", help="write the report here ('-': stdout)")
    p.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--package", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    ways = args.ways.split(",")
    unknown = set(ways) - set(WAYS)
    if unknown:
        p.error(f"unknown ways {sorted(unknown)}; choose from {', '.join(WAYS)}")

    import torch
    from reporting import write_json  # benchmarks/reporting.py, beside this script
    from safetensors.torch import save_file

    import ditfx
    from ditfx.models import zoo

    work = Path(tempfile.mkdtemp(prefix="cold_start_"))
    try:
        named = zoo.load(args.model, batch=args.batch)
        save_file({k: v.contiguous() for k, v in named.model.state_dict().items()}, str(work / "weights.safetensors"))
        torch.save(named.inputs, work / "inputs.pt")
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        ditfx.export(named.model, work / "package", example_inputs=named.inputs, config=config(), progress=say)
        build_s = time.perf_counter() - start
        torch._dynamo.reset()
        package_bytes = sum(f.stat().st_size for f in (work / "package").rglob("*") if f.is_file())
        base = work / "cache_base"
        prime(base)
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        for r in range(args.repeats):  # interleaved: every way once per round
            for way in ways:
                kind = way.removesuffix("_warm")
                cache = work / f"cache_{kind}_{r}"
                if not way.endswith("_warm"):
                    shutil.rmtree(cache, ignore_errors=True)
                    shutil.copytree(base, cache)
                elif not cache.exists():  # warm without its cold run first: fill it
                    shutil.copytree(base, cache)
                    spawn(args, kind, cache, work)
                runs[way].append(spawn(args, way, cache, work))
                say(f"round {r + 1}: {way}: first output after {runs[way][-1]['start_to_first_output_s']:.2f} s")
        summary = {way: {k: statistics.median(run[k] for run in rs) for k in
                         ("start_to_first_output_s", "first_call_s", "second_call_s", "import_torch_s", "setup_s")}
                   for way, rs in runs.items()}
        report = {
            "model": args.model, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
            "config": CACHE, "torch": torch.__version__, "machine": {"cpus": os.cpu_count()},
            "package": {"build_s": build_s, "bytes": package_bytes,
                        "artifacts": len(list((work / "package" / "artifacts").iterdir()))},
            "ways": summary, "runs": runs, "steady": steady(args, work),
        }
        ratios = {}
        if {"package", "regional"} <= set(summary):
            ratios["package_vs_regional_cold"] = (summary["package"]["start_to_first_output_s"]
                                                  / summary["regional"]["start_to_first_output_s"])
        if {"ditfx_warm", "regional_warm"} <= set(summary):
            ratios["ditfx_warm_vs_regional_warm_first_call"] = (summary["ditfx_warm"]["first_call_s"]
                                                                / summary["regional_warm"]["first_call_s"])
        report["ratios"] = ratios
        write_json(report, args.json)
        for way, s in summary.items():
            print(f"{way:<14} first output {s['start_to_first_output_s']:6.2f} s   "
                  f"first call {s['first_call_s']:6.2f} s"
                  f"   steady call {s['second_call_s']:.3f} s")
        print(f"package: built in {build_s:.0f} s, {package_bytes / 1e6:.1f} MB; steady generation "
              f"{report['steady']['package_vs_optimized']:.3f}x the optimized model's; ratios {ratios}")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
