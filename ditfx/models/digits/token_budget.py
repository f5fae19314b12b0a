"""The digits model's token-budget adapter: how it is made and where it is shipped.

    python -m ditfx.models.digits.token_budget --out ditfx/models/digits/weights --minutes 20

records generations of the shipped digits pipeline (random labels; guidance scales 1.5, 2.5 and 4; 25 and 50
steps), distils the patch-4 weak mode on them (:func:`ditfx.budget.distill`) and writes
``budget_p4.safetensors`` (the adapter, with its record) and ``budget_p4_loss.png`` (its loss curve).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ditfx.budget.adapter import BudgetAdapter
from ditfx.budget.training import distill, plot_loss

from .shipped import WEIGHTS_DIR, shipped_file

ADAPTER_FILE = "budget_p4.safetensors"
COMMAND = "python -m ditfx.models.digits.token_budget --out ditfx/models/digits/weights --minutes 20"
SCALES = (1.5, 2.5, 4.0)
STEP_COUNTS = (25, 50)


def budget_run(pipe, batch: int = 64) -> None:
    """One recording generation: random labels, a guidance scale and a step count drawn from the settings users
    run (the global RNG, which :func:`~ditfx.budget.training.distill` seeds per generation)."""
    labels = torch.randint(10, (batch,)).tolist()
    scale = SCALES[int(torch.randint(len(SCALES), (1,)))]
    steps = STEP_COUNTS[int(torch.randint(len(STEP_COUNTS), (1,)))]
    seed = int(torch.randint(2**31 - 1, (1,)))
    pipe(labels, guidance_scale=scale, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))


def budget_adapter() -> BudgetAdapter:
    """The shipped patch-4 weak-mode adapter of the digits model, for ``ditfx.TokenBudget(adapter=...)``."""
    return BudgetAdapter.load(shipped_file(ADAPTER_FILE, COMMAND))


def main(argv: list[str] | None = None) -> None:
    from .shipped import teacher_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of --minutes")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on the blocks' linears (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--weak-until", type=float, default=0.7)
    p.add_argument("--generations", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = teacher_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = distill(pipe, budget_run, patch_size=args.patch, minutes=args.minutes, steps=args.steps,
                      lora_rank=args.rank, weak_until=args.weak_until, generations=args.generations, lr=args.lr,
                      seed=args.seed)
    adapter.record["command"] = " ".join(["python -m ditfx.models.digits.token_budget",
                                          *(sys.argv[1:] if argv is None else argv)])
    stem = Path(ADAPTER_FILE).stem
    path = adapter.save(args.out / ADAPTER_FILE)
    plot_loss(adapter, args.out / f"{stem}_loss.png")
    print(json.dumps({k: v for k, v in adapter.record.items() if k != "loss_curve"}, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {args.out / (stem + '_loss.png')}")


if __name__ == "__main__":
    main()
