"""Measure the shipped digits model: class accuracy and digits-FD of guided and unguided samples.

    python -m ditfx.models.digits.evaluate --guidance-scales 1.5 2 3 4 5 --per-class 10

For each guidance scale (and for no guidance, scale 1) it samples ``per-class`` digits of each class
with 50-step Euler and reports the metrics, next to the FD that as many real train-split digits
reach against the same reference (the floor at that sample count). With ``--out`` it writes
``evaluation.json`` and ``samples.png`` (a 10x10 grid at the first listed guidance scale, one
column per class).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from .data import NUM_CLASSES
from .metrics import metrics, real_floor_fd
from .shipped import teacher_pipeline


def sample(
    pipe, per_class: int, guidance_scale: float, steps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of every class, ordered 0..9, 0..9, ... (so a grid row holds all ten)."""
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        labels, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator
    ).images
    return images, labels


def save_grid(
    images: torch.Tensor, path: Path, columns: int = NUM_CLASSES, scale: int = 6, gap: int = 2
) -> None:
    """Tile images (N, 1, 16, 16) in [-1, 1] into a black-on-white PNG, each pixel scale x scale."""
    rows = -(-len(images) // columns)
    size = images.shape[-1] * scale
    grid = Image.new("L", (columns * (size + gap) + gap, rows * (size + gap) + gap), color=128)
    # The scans are bright strokes on dark; invert so the digits read as ink on paper.
    pixels = ((1.0 - images[:, 0]) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, tile in enumerate(pixels):
        image = Image.fromarray(tile).resize((size, size), Image.Resampling.NEAREST)
        grid.paste(image, (gap + (i % columns) * (size + gap), gap + (i // columns) * (size + gap)))
    grid.save(path)


def evaluate(
    guidance_scales: list[float], per_class: int, steps: int, seed: int
) -> tuple[dict, dict[float, torch.Tensor]]:
    """(results for no guidance and each scale, the sampled images by scale)."""
    pipe = teacher_pipeline("euler")
    pipe.set_progress_bar_config(disable=True)
    count = per_class * NUM_CLASSES
    results = {
        "samples": count,
        "steps": steps,
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "seed": seed,
    }
    results["real_floor_fd"] = real_floor_fd(count)
    runs, grids = {}, {}
    for scale in [1.0, *guidance_scales]:
        start = time.perf_counter()
        images, labels = sample(pipe, per_class, scale, steps, seed)
        runs[f"{scale:g}"] = {
            **metrics(images, labels),
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        grids[scale] = images
        print(f"guidance {scale:g}: {runs[f'{scale:g}']}", flush=True)
    results["by_guidance_scale"] = runs
    return results, grids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.5])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for evaluation.json and samples.png")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (the machine is shared)"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, grids = evaluate(args.guidance_scales, args.per_class, args.steps, args.seed)
    results["command"] = "python -m ditfx.models.digits.evaluate " + " ".join(argv)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
        save_grid(grids[args.guidance_scales[0]][: 10 * NUM_CLASSES], args.out / "samples.png")


if __name__ == "__main__":
    main()
