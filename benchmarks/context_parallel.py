"""Context parallelism: one generation on one process against the same generation split over the ranks of
``torchrun`` (diffusers' Ulysses attention; gloo on CPU, nccl on GPUs), eager and with ditfx's DynamicCache.

    python benchmarks/context_parallel.py --json one.json                          # one process
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --json two.json     # two ranks

Each way runs one warm-up generation (compiles), then ``--rounds`` timed generations (median reported), and
reports the blocks skipped and NFE. On a CPU, gloo's collectives cost more than a tiny model's blocks: the point
of the CPU run is that every rank decides alike and matches one process; speed is for the GPU suite.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny:flux", help="a zoo model with a context-parallel plan in diffusers")
    p.add_argument("--steps", type=int, default=10, help="steps of each generation")
    p.add_argument("--threshold", type=float, default=0.3, help="DynamicCache threshold of the ditfx way")
    p.add_argument("--rounds", type=int, default=3, help="timed generations per way (median)")
    p.add_argument("--compiler", default="eager", help="ditfx's inner compiler (eager, aot_eager, inductor)")
    p.add_argument("--json", help="write the report here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    import torch.distributed as dist
    from reporting import write_json

    import ditfx
    from ditfx.models import zoo

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        rank = int(os.environ["RANK"])
        if cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        else:  # diffusers places a rank's mesh on rank % device_count(): on CPU there is no accelerator to count
            torch.accelerator.device_count = lambda: 1
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")

    def build():
        named = zoo.load(args.model)
        inputs = {}
        for name, value in named.inputs.items():  # every split sequence divides evenly (the same on one rank)
            if name in ("encoder_hidden_states", "encoder_hidden_states_mask", "txt_ids"):
                dim = 0 if name == "txt_ids" else 1
                while value.shape[dim] % max(world, 2):
                    value = torch.cat([value, value.narrow(dim, 0, 1)], dim)
            inputs[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        named = dataclasses.replace(named, model=named.model.to(device), inputs=inputs)
        if world > 1:
            from diffusers import ContextParallelConfig

            named.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        return named

    def timed(named, model, marked: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            if marked:
                with ditfx.generation(model):
                    zoo.run_loop(named, model, steps=args.steps)
            else:
                zoo.run_loop(named, model, steps=args.steps)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    eager = build()
    timed(eager, None, False)
    rows.append({"way": "eager", "seconds": statistics.median(timed(eager, None, False) for _ in range(args.rounds))})
    named = build()
    fast = ditfx.optimize(named.model, ditfx.Config(cache=ditfx.DynamicCache(threshold=args.threshold),
                                                    compiler=args.compiler))
    timed(named, fast, True)
    ditfx.reset_stats(fast)
    seconds = statistics.median(timed(named, fast, True) for _ in range(args.rounds))
    s = ditfx.stats(fast)
    rows.append({"way": f"ditfx DynamicCache({args.threshold})", "seconds": seconds,
                 "skipped_per_generation": s.block_evals_skipped / args.rounds, "nfe": s.nfe / args.rounds})
    report = {"model": args.model, "steps": args.steps, "ranks": world, "device": str(device),
              "torch": torch.__version__, "rows": rows}
    if world == 1 or dist.get_rank() == 0:
        for r in rows:
            print(f"{r['way']:>28}: {r['seconds']:.3f} s per generation on {world} rank(s)"
                  + (f", {r['skipped_per_generation']:.0f} blocks skipped" if "skipped_per_generation" in r else ""))
        write_json(report, args.json)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
