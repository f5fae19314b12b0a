"""Running a tiny zoo model under diffusers' context parallelism in two gloo processes (Ulysses attention), and the
same model in this process, for tests/test_context_parallel.py."""
from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 6
TIMEOUT_S = 60  # a rank waiting this long in a collective fails (gloo's timeout), never hangs


def even_sequences(named):
    """The zoo model's inputs with text sequences of even length: diffusers splits every split sequence evenly
    over the ranks (the zoo's tiny models have 5 text tokens)."""
    import dataclasses

    inputs = dict(named.inputs)
    for name, dim in (("encoder_hidden_states", 1), ("encoder_hidden_states_mask", 1), ("encoder_attention_mask", 1),
                      ("txt_ids", 0)):
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[dim] % WORLD:
            inputs[name] = torch.cat([value, value.narrow(dim, 0, 1)], dim)
    return dataclasses.replace(named, inputs=inputs)


def generate(family: str, config, parallel: bool, guidance: str | None = None) -> tuple[torch.Tensor, dict]:
    """One generation of the tiny ``family`` model optimized with ``config`` (under context parallelism over the
    initialised process group when ``parallel``), without guidance or with classifier-free guidance in one
    ``"batched"`` call or ``"two"`` calls per step: its output and its stats."""
    import ditfx
    from ditfx.models import zoo

    named = even_sequences(zoo.load(f"tiny:{family}"))
    if parallel:
        from diffusers import ContextParallelConfig

        named.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    fast = ditfx.optimize(named.model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ditfx.generation(fast), torch.no_grad():
            if guidance is None:
                out = zoo.run_loop(named, fast, steps=STEPS)
            else:
                from conftest import cfg_loop

                out = cfg_loop(fast, named.inputs, family, steps=STEPS, two_calls=guidance == "two")
    s = ditfx.stats(fast)
    return out, {"skipped": s.block_evals_skipped, "evals": s.block_evals, "nfe": s.nfe,
                 "graphs_without_ditfx": s.graphs_without_ditfx, "graph_breaks": s.graph_breaks}


def _rank(rank: int, store: str, family: str, config, guidance: str | None, out: str) -> None:
    import torch.distributed as dist

    # diffusers places a rank's mesh on rank % device_count(); on CPU there is no accelerator to count
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result, stats = generate(family, config, parallel=True, guidance=guidance)
        torch.save({"out": result, "stats": stats}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_parallel(tmp_path: Path, family: str, config, guidance: str | None = None) -> list[dict]:
    """Each rank's output and stats; a rank that fails or stalls fails the call (after gloo's timeout)."""
    out = str(tmp_path / "rank")
    args = (str(tmp_path / "store"), family, config, guidance, out)
    ctx = mp.start_processes(_rank, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S * 5  # gloo's timeout ends a rank stuck in a collective; this, the rest
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"the {WORLD} ranks of {family} did not finish within {TIMEOUT_S * 5} s")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
