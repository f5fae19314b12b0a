"""What capturing the reference DiT costs in Dynamo, whole or around opaque blocks (evidence for issue #2).

ditfx captures the whole model, so Dynamo visits every block; regional compilation traces one block. This
measures Dynamo's own time (``_compile.compile_inner``, backend returning the graph uncompiled) for:

- ``whole``: the model as ditfx.optimize captures it today (blocks are nested compile regions, stamped out);
- ``skeleton``: the model with each block called through an opaque custom op, which Dynamo does not trace;
- ``block``: one block traced alone, as regional compilation does.

``skeleton + block`` is what a front end that captures one block per structure and the model around the blocks
would pay in Dynamo. The blocks are swapped in a shallow copy of the model; the model itself is not touched.

    python benchmarks/capture_cost.py --model DiT-XL/2 --json out/capture_cost_xl.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
from reporting import write_json  # benchmarks/reporting.py, beside this script
from torch._dynamo.utils import compilation_time_metrics

from ditfx.models import zoo

_BLOCKS: list[nn.Module] = []  # what the opaque op runs; set by main


@torch.library.custom_op("ditfx_bench::opaque_block", mutates_args=())
def opaque_block(index: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return _BLOCKS[index](x, c)


@opaque_block.register_fake
def _(index, x, c):
    return torch.empty_like(x)  # a reference DiT block maps (N, T, D) to (N, T, D)


class OpaqueBlock(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x, c):
        return opaque_block(self.index, x, c)


def with_opaque_blocks(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose blocks are opaque calls to the real ones."""
    skeleton = copy.copy(model)
    skeleton._modules = dict(model._modules)
    skeleton._modules["blocks"] = nn.ModuleList(OpaqueBlock(i) for i in range(len(model.blocks)))
    return skeleton


def uncompiled(gm, example_inputs):
    return gm.forward


def dynamo_seconds(run) -> float:
    """Dynamo's time in ``run()`` from a fresh state (the backend leaves graphs uncompiled)."""
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    with torch.no_grad():
        run()
    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def measure(name: str, rounds: int) -> dict:
    named = zoo.load(name, batch=2)
    model = named.model
    _BLOCKS[:] = list(model.blocks)
    skeleton = with_opaque_blocks(model)
    width = model.blocks[0].attn.qkv.in_features
    tokens = (model.config.input_size // model.config.patch_size) ** 2
    x, c = torch.randn(2, tokens, width), torch.randn(2, width)
    ways = {
        "whole": lambda: named(torch.compile(model, backend=uncompiled, dynamic=False)),
        "skeleton": lambda: named(torch.compile(skeleton, backend=uncompiled, dynamic=False)),
        "block": lambda: torch.compile(model.blocks[0], backend=uncompiled, dynamic=False)(x, c),
    }
    for run in ways.values():  # untimed: one-time costs of a fresh process
        dynamo_seconds(run)
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, run in ways.items():
            times[way].append(round(dynamo_seconds(run), 3))
    med = {way: statistics.median(t) for way, t in times.items()}
    return {"model": name, "blocks": len(model.blocks), "dynamo_s": times,
            "median_s": {**{w: round(m, 3) for w, m in med.items()},
                         "skeleton+block": round(med["skeleton"] + med["block"], 3)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    report = {"benchmark": "capture_cost", "torch": torch.__version__, **measure(args.model, args.rounds)}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(report["median_s"], file=sys.stderr)
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
