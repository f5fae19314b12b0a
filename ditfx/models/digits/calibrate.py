"""Calibrate the digits DiT on its own pipeline (batched CFG, Euler): the static block-cache schedule and
LinearAG's coefficients.

The schedule ships as ``weights/cache_schedule.json`` (plus its heatmap PNG), the coefficients as
``weights/linear_ag.json``; ``ditfx demo`` and the benchmarks use them. Reproduce both with::

    python -m ditfx.models.digits.calibrate --out ditfx/models/digits/weights/cache_schedule.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sampling import class_grid, generate
from .shipped import WEIGHTS_DIR, load_transformer

SCHEDULE_FILE = "cache_schedule.json"
LINEAR_AG_FILE = "linear_ag.json"
DEFAULT_GUIDANCE_SCALE = 1.5


def calibrate_cache(steps: int = 50, generations: int = 1, per_class: int = 10,
                    guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 1000):
    """Record each block's change curve over ``generations`` uncached generations (seeds distinct from the
    demo's and the benchmarks'), and return the :class:`~ditfx.cache.schedule.CacheSchedule`."""
    from ditfx.cache.calibration import calibrate

    labels = class_grid(per_class)
    counter = iter(range(generations))

    def one_generation(model):
        generate(model, labels, steps, guidance_scale, seed + next(counter),
                 progress={"desc": "calibrating", "file": sys.stderr, "leave": False})

    schedule = calibrate(load_transformer(), one_generation, generations=generations)
    schedule.meta.update(model="digits", steps=steps, per_class=per_class, guidance_scale=guidance_scale,
                         seed=seed, command="python -m ditfx.models.digits.calibrate " + " ".join(sys.argv[1:]))
    return schedule


def calibrate_linear_ag(steps: int = 50, generations: int = 2, per_class: int = 4,
                        guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 2000):
    """Record full-guidance trajectories and fit LinearAG's per-step coefficients for ``steps`` Euler steps."""
    from ditfx.guidance.calibration import calibrate_guidance

    labels = class_grid(per_class)
    counter = iter(range(generations))

    def one_generation(model):
        generate(model, labels, steps, guidance_scale, seed + next(counter),
                 progress={"desc": "recording guidance", "file": sys.stderr, "leave": False})

    coefficients = calibrate_guidance(load_transformer(), one_generation, generations=generations)
    coefficients.meta.update(model="digits", steps=steps, per_class=per_class, guidance_scale=guidance_scale,
                             seed=seed)
    return coefficients


def shipped_file(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; create it with: python -m ditfx.models.digits.calibrate")
    return path


def shipped_schedule_path() -> Path:
    return shipped_file(SCHEDULE_FILE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--generations", type=int, default=1)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--delta", type=float, default=0.5, help="delta of the heatmap written next to the JSON")
    p.add_argument("--out", default=str(WEIGHTS_DIR / SCHEDULE_FILE))
    p.add_argument("--linear-ag-out", default=str(WEIGHTS_DIR / LINEAR_AG_FILE),
                   help="also fit LinearAG's coefficients and write them here ('' to skip)")
    args = p.parse_args(argv)
    if args.linear_ag_out:
        coefficients = calibrate_linear_ag(args.steps, guidance_scale=args.guidance_scale)
        print(f"wrote {coefficients.save(args.linear_ag_out)}")
    schedule = calibrate_cache(args.steps, args.generations, args.per_class, args.guidance_scale)
    out = schedule.save(args.out)
    png = schedule.heatmap(out.with_suffix(".png"), args.delta)
    plan = schedule.plan(args.delta)
    evals, full = sum(map(sum, plan)), len(plan) * len(plan[0])
    print(f"wrote {out} and {png}: at delta {args.delta}, {evals}/{full} block evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
