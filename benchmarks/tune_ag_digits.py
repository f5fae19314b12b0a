"""Adaptive Guidance alone on the digits pipeline, tuned inside its own check's budget (digits-FD within 5 %,
accuracy within one point): the study `benchmarks/tune_digits.py` runs per setting, here with the digits per class
as an argument (the accuracy bound is two digits at 10 per class over two seeds, eight at 20).

    python benchmarks/tune_ag_digits.py --settings 1.5:25 1.5:50 --per-class 10 --workdir out/tune2 \
        --json docs/results/tune_ag_1.5.json
    python benchmarks/tune_ag_digits.py --settings 1.5:25 --per-class 20 --workdir out/pc20 \
        --json docs/results/tune_ag_1.5_per_class_20.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tune_digits import _finite, study  # benchmarks/tune_digits.py, beside this script

from ditfx.models import digits
from ditfx.tuning import QualityBudget


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["1.5:25"], help="guidance_scale:steps pairs")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=Path("out/tune_ag"))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for setting in args.settings:
        scale, steps = setting.split(":")
        run = digits.TuningRun(guidance_scale=float(scale), steps=int(steps), per_class=args.per_class)
        budget = QualityBudget(psnr=None, fd=0.05, accuracy=0.01, metric=run.metric)
        _, out[setting] = study("guidance", digits.pipeline(), run, budget,
                                digits.tuning_space(run, cache=None, budget=False),
                                args.workdir / setting.replace(":", "_"), timing=0)
        args.json.write_text(json.dumps(_finite(out), indent=1))  # after each setting: a long run keeps its part
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
