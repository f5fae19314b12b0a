"""Block caching on the reference DiT-S/2 at 256 tokens, 50-step loop, on this machine's CPU (or a GPU).

Compares eager, torch.compile (Inductor), ditfx without caching and ditfx with a calibrated static schedule that
skips about half the block evaluations: wall time of the loop (compilation excluded, reported separately as the
first call's time), FLOPs from ditfx's cost model (which matches torch.utils.flop_counter, see
tests/graph/test_cost.py), and the realized speed-up over the FLOPs ratio.

    python benchmarks/block_cache.py --json out/block_cache.json
    python benchmarks/block_cache.py --first-call-only --model DiT-XL/2 --json out/first_call_xl.json
    python benchmarks/block_cache.py --first-call-only --model flux-S --json out/first_call_flux.json

``flux-S`` (first-call rounds only) is a random diffusers ``FluxTransformer2DModel`` at DiT-S/2's width (384) and
depth (12 blocks: 4 double-stream, 8 single-stream), 256 image and 32 text tokens: a diffusers model, whose blocks
Dynamo traces one by one inside ditfx's whole-model capture, compared with ``compile_repeated_blocks``.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time

import torch
from reporting import write_json  # benchmarks/reporting.py, beside this script
from torch._dynamo.utils import compilation_time_metrics

import ditfx
from ditfx.api import repeated_blocks
from ditfx.models import zoo


def timed_loop(named, model, steps):
    start = time.perf_counter()
    zoo.run_loop(named, model, steps=steps)
    return time.perf_counter() - start


def first_call(named, model):
    start = time.perf_counter()
    with torch.no_grad():
        named(model)
    return time.perf_counter() - start


def build_regional(model):
    import copy

    regional = copy.deepcopy(model)
    for sub in regional.modules():
        if type(sub).__name__ in regional._repeated_blocks:
            sub.compile()
    return regional


def flux_s(batch: int) -> zoo.NamedModel:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8,
                                   attention_head_dim=64, num_attention_heads=6, joint_attention_dim=64,
                                   pooled_projection_dim=32, axes_dims_rope=(16, 24, 24))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(batch, 256, 16, generator=g), timestep=torch.full((batch,), 0.7),
                  encoder_hidden_states=torch.randn(batch, 32, 64, generator=g),
                  pooled_projections=torch.randn(batch, 32, generator=g), img_ids=torch.zeros(256, 3),
                  txt_ids=torch.zeros(32, 3))
    return zoo.NamedModel(model, inputs, "hidden_states", "timestep", 1.0, True)


def delta_for_fraction(schedule, fraction):
    """The smallest delta whose plan runs at most ``fraction`` of the block evaluations (bisection)."""
    lo, hi = 0.0, max(sum(c) for c in schedule.change)
    full = len(schedule.blocks) * schedule.steps
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(map(sum, schedule.plan(mid))) / full <= fraction:
            hi = mid
        else:
            lo = mid
    return hi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--skip", type=float, default=0.5, help="fraction of block evaluations to skip")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved first-call rounds of regional compilation and ditfx (medians compared)")
    p.add_argument("--first-call-only", action="store_true",
                   help="only the first-call rounds (no loops): compares compile time on deeper models quickly")
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    if args.first_call_only:
        return first_call_only(args)
    if args.model == "flux-S":
        p.error("--model flux-S is for --first-call-only (the 50-step loops run the reference DiT)")

    # Cold compiles for every variant: no Inductor/AOT cache hits from an earlier variant or run.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    named = zoo.load(args.model, batch=args.batch)
    zoo.randomize(named.model, std=0.02)  # trained-like small weights: the official init outputs zeros
    results = {}

    def record(name, model, **extra):
        compile_s = first_call(named, model)
        wall = timed_loop(named, model, args.steps)
        results[name] = {"first_call_s": round(compile_s, 3), "loop_s": round(wall, 3), **extra}
        print(f"{name:<22} first call {compile_s:7.2f} s   {args.steps}-step loop {wall:7.2f} s", file=sys.stderr)

    record("eager", named.model)
    torch._dynamo.reset()
    record("torch.compile", torch.compile(named.model))
    torch._dynamo.reset()
    # Regional compilation as diffusers' ModelMixin.compile_repeated_blocks does it: Module.compile on every block
    # whose class is listed in `_repeated_blocks` (the reference DiT lists DiTBlock), the rest stays eager.
    regional = build_regional(named.model)
    record("regional torch.compile", regional)
    torch._dynamo.reset()
    plain = ditfx.optimize(named.model, ditfx.Config())
    record("ditfx", plain)
    s = ditfx.stats(plain)
    full_flops = s.flops / s.calls
    results["ditfx"].update(flops_per_loop=int(full_flops * args.steps), region_compiles=s.region_compiles)
    torch._dynamo.reset()
    everything = ditfx.optimize(named.model, ditfx.Config(compile_regions="all"))
    record("ditfx compile_regions=all", everything)
    results["ditfx compile_regions=all"]["region_compiles"] = ditfx.stats(everything).region_compiles

    torch._dynamo.reset()
    schedule = ditfx.calibrate(named.model, lambda m: zoo.run_loop(named, m, steps=args.steps), generations=1)
    delta = delta_for_fraction(schedule, 1 - args.skip)
    cache = ditfx.StaticCache(delta, schedule, per_block=True, forecast="none")
    cached = ditfx.optimize(named.model, ditfx.Config(cache=cache))
    first_call(named, cached)
    ditfx.reset_stats(cached)
    with ditfx.generation(cached):
        start = time.perf_counter()
        zoo.run_loop(named, cached, steps=args.steps)
        wall = time.perf_counter() - start
    s = ditfx.stats(cached)
    results["ditfx+static_cache"] = {"loop_s": round(wall, 3), "delta": delta, "flops_per_loop": s.flops,
                                     "block_evals": s.block_evals, "block_evals_skipped": s.block_evals_skipped}
    print(f"{'ditfx+static_cache':<22} {args.steps}-step loop {wall:7.2f} s  "
          f"({s.block_evals_skipped}/{s.block_evals + s.block_evals_skipped} blocks skipped)", file=sys.stderr)

    rounds, first = first_call_rounds(named, args.rounds)

    base = results["ditfx"]
    flops_ratio = base["flops_per_loop"] / s.flops
    speedup = base["loop_s"] / wall
    summary = {
        "ditfx_vs_torch_compile": round(results["torch.compile"]["loop_s"] / base["loop_s"], 3),
        "ditfx_vs_eager": round(results["eager"]["loop_s"] / base["loop_s"], 3),
        "cache_speedup": round(speedup, 3),
        "cache_flops_ratio": round(flops_ratio, 3),
        "realized_over_flops_ratio": round(speedup / flops_ratio, 3),
        "first_call_ditfx_over_torch_compile": round(base["first_call_s"] / results["torch.compile"]["first_call_s"],
                                                     3),
        "ditfx_all_regions_vs_torch_compile": round(
            results["torch.compile"]["loop_s"] / results["ditfx compile_regions=all"]["loop_s"], 3),
        **first,
    }
    report = {"benchmark": "block_cache", "model": args.model, "batch": args.batch, "steps": args.steps,
              "tokens": (named.model.config.input_size // named.model.config.patch_size) ** 2,
              "machine": machine(),
              "results": results, "first_call_rounds": rounds, "summary": summary}
    return write_report(report, args.json)


def first_call_rounds(named, n_rounds: int) -> tuple[dict, dict]:
    """First calls of regional compilation and of ditfx in ``n_rounds`` interleaved rounds, each followed by one
    steady call: the first call minus it is the compile overhead (the first call also runs the model once).

    First calls vary by tens of percent run to run on a shared CPU, so medians are compared; each round is a
    cold compile (fresh Dynamo state, Inductor caches off, earlier rounds' garbage collected) after an untimed
    one.
    """
    builders = {"regional torch.compile": lambda: build_regional(named.model),
                "ditfx": lambda: ditfx.optimize(named.model, ditfx.Config())}
    rounds = {name: {"first_call_s": [], "steady_call_s": []} for name in builders}
    for timed in [False] + [True] * n_rounds:  # an untimed round first: a fresh process pays one-time costs
        for name, build in builders.items():
            torch._dynamo.reset()
            model = build()
            # Earlier rounds' graphs are garbage now; collected during a trace they cost whichever side runs then.
            gc.collect()
            compilation_time_metrics.clear()
            first = first_call(named, model)
            phases = first_call_phases()
            steady = first_call(named, model)
            if timed:
                rounds[name]["first_call_s"].append(round(first, 3))
                rounds[name]["steady_call_s"].append(round(steady, 3))
                rounds[name].setdefault("phases_s", []).append(phases)
    print(f"first and steady calls over {n_rounds} rounds: {rounds}", file=sys.stderr)

    def median(name, key):
        return statistics.median(rounds[name][key])

    def overhead(name):
        return statistics.median(f - s for f, s in zip(rounds[name]["first_call_s"], rounds[name]["steady_call_s"]))

    regional, ours = "regional torch.compile", "ditfx"
    return rounds, {
        "first_call_ditfx_over_regional_compile": round(
            median(ours, "first_call_s") / median(regional, "first_call_s"), 3),
        "compile_overhead_ditfx_over_regional_compile": round(overhead(ours) / overhead(regional), 3),
        "compile_overhead_s": {name: round(overhead(name), 3) for name in builders},
        "first_call_phases_s": {name: {key: round(statistics.median(p[key] for p in rounds[name]["phases_s"]), 3)
                                       for key in rounds[name]["phases_s"][0]} for name in builders},
    }


def first_call_phases() -> dict:
    """Where one first call's compile time went (Dynamo's own timers): ``dynamo`` is tracing and guards without
    the backend call, ``backend`` the backend called by Dynamo (ditfx's passes; regional compilation's whole
    Inductor compile), ``inductor`` every Inductor compile (ditfx's happen when a region first runs), and
    Dynamo's per-block work on nested compile regions."""
    def seconds(key):
        return sum(compilation_time_metrics.get(key, []))

    phases = {"dynamo": seconds("_compile.compile_inner") - seconds("OutputGraph.call_user_compiler"),
              "backend": seconds("OutputGraph.call_user_compiler"),
              "inductor": seconds("create_aot_dispatcher_function")}
    phases.update({key: seconds(key) for key in compilation_time_metrics if key.startswith("invoke_subgraph")})
    return {key: round(value, 3) for key, value in phases.items()}


def first_call_only(args):
    """Only the interleaved first-call rounds (any model size: no 50-step loops)."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    named = flux_s(args.batch) if args.model == "flux-S" else zoo.load(args.model, batch=args.batch)
    zoo.randomize(named.model, std=0.02)
    rounds, summary = first_call_rounds(named, args.rounds)
    return write_report({"benchmark": "block_cache first call", "model": args.model, "batch": args.batch,
                         "blocks": len(repeated_blocks(named.model)), "machine": machine(),
                         "first_call_rounds": rounds, "summary": summary}, args.json)


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def write_report(report: dict, path: str | None) -> dict:
    print(json.dumps(report["summary"], indent=1), file=sys.stderr)
    write_json(report, path)
    return report

if __name__ == "__main__":
    main()
