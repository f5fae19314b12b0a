"""The Pareto plot of a tuning record: speed-up against each quality measure, every evaluated point, the front
joined, the budget's bounds drawn and the chosen point marked."""
from __future__ import annotations

from pathlib import Path

# (quality key, axis label, +1 if higher is better, the budget's bound from the tuning record)
MEASURES = (("psnr", "PSNR (dB) vs reference", 1, lambda t: t["budget"].get("psnr")),
            ("ssim", "SSIM vs reference", 1, lambda t: t["budget"].get("ssim")),
            ("fd_change", "|FD change| / reference FD", -1, lambda t: t["budget"].get("fd")),
            ("accuracy", "class accuracy", 1, lambda t: None if t["budget"].get("accuracy") is None else
             _number(t["reference"]["measures"]["accuracy"]) - t["budget"]["accuracy"]))


def _number(value) -> float:
    return float(value)  # the record writes inf as "inf"


def _front_2d(points: list[dict], key: str, sign: int) -> list[dict]:
    """The points no other beats on both speed and this measure, in the order of the measure."""
    rs = [r for r in points if key in r["quality"]]
    # best measure first; a point is on the front when it is faster than every point with a better measure
    rs.sort(key=lambda r: (-sign * _number(r["quality"][key]), -r["speed"]))
    front, fastest = [], 0.0
    for r in rs:
        if r["speed"] > fastest:
            front.append(r)
            fastest = r["speed"]
    return sorted(front, key=lambda r: _number(r["quality"][key]))


def pareto(tuning: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, chosen = tuning["points"], tuning.get("chosen")
    shown = [m for m in MEASURES if any(m[0] in p["quality"] for p in points)]
    if not shown:
        raise ValueError("the tuning record has no quality measures to plot")
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, (key, label, sign, bound) in zip(axes[0], shown):
        def xy(rs, key=key):
            rs = [r for r in rs if key in r["quality"]]
            return [min(_number(r["quality"][key]), 80.0) for r in rs], [r["speed"] for r in rs]

        inside = [p for p in points if p["inside"]]
        outside = [p for p in points if not p["inside"]]
        ax.scatter(*xy(outside), s=14, c="#bbbbbb", label="outside the budget")
        ax.scatter(*xy(inside), s=14, c="#4477aa", label="inside")
        fx, fy = xy(_front_2d(points, key, sign))
        ax.step(fx, fy, where="post" if sign > 0 else "pre", c="#4477aa", lw=0.8, alpha=0.6,
                label="Pareto front (this measure)")
        if chosen is not None and key in chosen["quality"]:
            ax.scatter(*xy([chosen]), s=160, marker="*", c="#cc3311", zorder=5, label="chosen")
        limit = bound(tuning)
        if limit is not None:
            ax.axvline(limit, c="#cc3311", ls="--", lw=0.8)
        ax.set_xlabel(label + (" (inf shown at 80)" if key == "psnr" else ""))
        ax.set_ylabel("speed-up (FLOPs)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ditfx.tune: {tuning['evaluations']} configurations, spaces {', '.join(tuning['spaces'])}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
