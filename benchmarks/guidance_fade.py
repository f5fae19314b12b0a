"""How full CFG's guidance direction decays after Adaptive Guidance would switch: the evidence behind
``AdaptiveGuidance(fill="delta")``'s linear fade, on the digits pipeline.

One eager full-CFG generation is recorded (a forward hook on the transformer). Per sample, ``k`` is the first step
whose cosine of the conditional and unconditional predictions reaches gamma; for every later step ``t`` the
guidance direction ``d_t = c_t - u_t`` is projected on ``d_k``: ``<d_t, d_k> / |d_k|^2``. ``fill="delta"``
assumes this is ``t / t_k``. Reported: the median projection over samples in bins of ``t / t_k``.

    python benchmarks/guidance_fade.py --json out/guidance_fade.json
"""
from __future__ import annotations

import argparse
import sys

import torch
from guidance import add_sampling_arguments  # benchmarks/guidance.py, beside this script
from reporting import write_json

import ditfx
from ditfx.models import digits
from ditfx.models.digits.sampling import class_grid, generate

BINS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)  # t / t_k, high to low


def record_cfg(per_class: int, steps: int, scale: float, seed: int):
    """Timesteps (T,) and the unconditional and conditional predictions (T, N, D) of one eager generation."""
    model = digits.load_transformer()
    times, outputs = [], []

    def hook(module, args, kwargs, out):
        times.append(float(kwargs["timestep"].flatten()[0]))
        outputs.append(out[0].detach().flatten(1).double())

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        generate(model, class_grid(per_class), steps, scale, seed)
    finally:
        handle.remove()
    n = outputs[0].shape[0] // 2  # the pipeline batches the unconditional half first
    out = torch.stack(outputs)
    return torch.tensor(times, dtype=torch.float64), out[:, :n], out[:, n:]


def fade_points(t: torch.Tensor, u: torch.Tensor, c: torch.Tensor, gamma: float) -> list[tuple[float, float]]:
    """(t / t_k, projection of d_t on d_k) for every sample and every step after its switch step k."""
    cos = torch.nn.functional.cosine_similarity(c, u, dim=2)  # (T, N)
    d = c - u
    points = []
    for i in range(c.shape[1]):
        reached = (cos[:, i] >= gamma).nonzero()
        if len(reached) == 0:
            continue
        k = int(reached[0])
        proj = d[k:, i] @ d[k, i] / d[k, i].dot(d[k, i])
        points += [(float(a), float(b)) for a, b in zip(t[k:] / t[k], proj)]
    return points


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sampling_arguments(p)
    p.add_argument("--gamma", type=float, default=ditfx.AdaptiveGuidance().gamma)
    p.add_argument("--json", nargs="?", const="-", help="write JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    t, u, c = record_cfg(args.per_class, args.steps, args.guidance_scale, args.seed)
    points = fade_points(t, u, c, args.gamma)
    bins = []
    for hi, lo in zip(BINS, BINS[1:]):
        inside = [(r, q) for r, q in points if lo <= r < hi or r == hi == 1.0]
        row = {"t_over_tk": [lo, hi], "points": len(inside), "median_t_over_tk": None, "median_projection": None}
        if inside:
            ratio, proj = torch.tensor(inside).T
            row.update(median_t_over_tk=float(ratio.median()), median_projection=float(proj.median()))
            print(f"t/t_k in [{lo:.1f}, {hi:.1f}]: {len(inside):5d} points, median t/t_k "
                  f"{row['median_t_over_tk']:.3f}, median projection {row['median_projection']:.3f}", file=sys.stderr)
        bins.append(row)
    switched = sum(r == 1.0 for r, _ in points)  # one point at t = t_k per switched sample
    report = {"benchmark": "guidance_fade", "settings": vars(args), "samples": u.shape[1], "switched": switched,
              "bins": bins}
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
