"""Train the digits DiT with rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler samples.

    python -m ditfx.models.digits.train --out DIR --steps N --seed S

Convention (diffusers' FlowMatchEulerDiscreteScheduler.scale_noise / step): with sigma in [0, 1],
``x_t = (1 - sigma) * x0 + sigma * noise``, the model sees ``timestep = sigma * 1000`` and predicts
the velocity ``noise - x0``; the Euler step ``x + (sigma_next - sigma) * v`` goes toward the data.
Labels are replaced by the null class with probability 10 % so one model gives both halves of
classifier-free guidance. The shipped weights are an exponential moving average of the trained ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .data import train_split
from .model import (
    NULL_CLASS,
    build_transformer,
    disable_builtin_label_dropout,
    initialise_like_dit,
    parameter_count,
)

NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's default: timestep = sigma * 1000
LABEL_DROPOUT = 0.1
LOSS_CURVE_POINTS = 200


class ShuffledBatches:
    """Endless batches over a fixed tensor, reshuffled each epoch by a seeded generator."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.generator = batch_size, generator
        self.order, self.position = torch.randperm(len(labels), generator=generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.order):
            # Drop the short tail so every batch has the same size, then start a new epoch.
            self.order, self.position = (
                torch.randperm(len(self.labels), generator=self.generator),
                0,
            )
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.images[index], self.labels[index]


def flow_matching_loss(transformer, x0, labels, generator: torch.Generator) -> torch.Tensor:
    """Mean squared error of the predicted velocity at a uniformly drawn noise level."""
    batch = x0.shape[0]
    drop = torch.rand(batch, generator=generator) < LABEL_DROPOUT
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    sigma = torch.rand(batch, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(batch, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    velocity = transformer(
        hidden_states=x_t,
        timestep=sigma * NUM_TRAIN_TIMESTEPS,
        class_labels=labels,
        return_dict=False,
    )[0]
    return F.mse_loss(velocity, noise - x0)


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, model, step: int, max_decay: float) -> None:
    # The warm-up keeps the average from being dominated by the random initial weights early on.
    decay = min(max_decay, (1.0 + step) / (10.0 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def save_loss_plot(steps: list[int], losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses)
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss (mean per point)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train(
    out: Path, steps: int, seed: int, batch_size: int, lr: float, warmup: int, ema_decay: float
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the initial weights
    generator = torch.Generator().manual_seed(
        seed
    )  # data order, label dropout, noise levels, noise

    data = train_split()
    batches = ShuffledBatches(data.images, data.labels, batch_size, generator)

    transformer = build_transformer()
    initialise_like_dit(transformer)
    disable_builtin_label_dropout(transformer)
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)

    losses: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="train digits DiT", mininterval=5.0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        x0, labels = batches.next()
        loss = flow_matching_loss(transformer, x0, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, transformer, step, ema_decay)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    wall_time = time.perf_counter() - start

    # Loss curve samples: means over equal windows, so the JSON stays small for any step count.
    window = max(1, steps // LOSS_CURVE_POINTS)
    curve_steps = list(range(window, steps + 1, window))
    curve = [sum(losses[s - window : s]) / window for s in curve_steps]

    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, out / "model.safetensors")
    ema.save_config(out)  # config.json, readable by DiTTransformer2DModel.from_config
    record = {
        "command": f"python -m ditfx.models.digits.train --out {out} --steps {steps} --seed {seed} "
        f"--batch-size {batch_size} --lr {lr} --warmup {warmup} --ema-decay {ema_decay}",
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": f"linear warm-up {warmup} steps, cosine to 10 %",
        "optimizer": "AdamW(weight_decay=0), grad-norm clip 1.0",
        "ema_decay": ema_decay,
        "label_dropout": LABEL_DROPOUT,
        "objective": "rectified flow: x_t=(1-s)x0+s*noise, t=1000s, s~U(0,1), target noise-x0",
        "train_images": len(data),
        "parameters": parameter_count(transformer),
        "wall_time_s": round(wall_time, 1),
        "seconds_per_step": round(wall_time / steps, 3),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "loss_curve": {"steps": curve_steps, "loss": [round(v, 5) for v in curve]},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    save_loss_plot(curve_steps, curve, out / "loss.png")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for model.safetensors and records"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (the machine is shared)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = train(
        args.out, args.steps, args.seed, args.batch_size, args.lr, args.warmup, args.ema_decay
    )
    print(
        f"done: {record['steps']} steps in {record['wall_time_s']} s, "
        f"final loss {record['final_loss_mean_last_100']:.4f}"
    )


if __name__ == "__main__":
    main()
