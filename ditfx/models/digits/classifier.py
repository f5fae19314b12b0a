"""A small CNN digit classifier, trained here on the train split; its features drive the digits-FD.

    python -m ditfx.models.digits.classifier --out DIR

Writes ``classifier.safetensors`` and ``classifier.json`` (held-out accuracy, seed, set-up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES, held_out_split, train_split

FEATURE_DIM = 64  # small, so Frechet statistics from a few hundred images are well conditioned


class DigitsClassifier(nn.Module):
    """Two conv stages (16x16 -> 8x8 -> 4x4), a FEATURE_DIM-wide hidden layer, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, FEATURE_DIM) of images (N, 1, 16, 16) in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(images))


def random_shift(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 1
) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with background (-1).

    Generated digits are not centred exactly like the scans; small shifts keep the classifier from
    depending on the exact position.
    """
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [
            padded[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )


@torch.no_grad()
def accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    return (classifier(images).argmax(dim=1) == labels).float().mean().item()


def train_classifier(out: Path, seed: int, epochs: int, batch_size: int, lr: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, held_out = train_split(), held_out_split()

    classifier = DigitsClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    start = time.perf_counter()
    for _ in range(epochs):
        classifier.train()
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(batch_size):
            images = random_shift(train.images[batch], generator)
            loss = F.cross_entropy(classifier(images), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    wall_time = time.perf_counter() - start
    classifier.eval()

    save_file(
        {k: v.contiguous() for k, v in classifier.state_dict().items()},
        out / "classifier.safetensors",
    )
    record = {
        "command": "python -m ditfx.models.digits.classifier "
        f"--out {out} --seed {seed} --epochs {epochs}",
        "held_out_accuracy": accuracy(classifier, held_out.images, held_out.labels),
        "train_accuracy": accuracy(classifier, train.images, train.labels),
        "held_out_images": len(held_out),
        "train_images": len(train),
        "feature_dim": FEATURE_DIM,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augmentation": "random shift by up to 1 pixel",
        "wall_time_s": round(wall_time, 1),
        "torch_version": torch.__version__,
    }
    (out / "classifier.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (the machine is shared)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = train_classifier(args.out, args.seed, args.epochs, args.batch_size, args.lr)
    print(f"held-out accuracy {record['held_out_accuracy']:.4f} after {record['wall_time_s']} s")


if __name__ == "__main__":
    main()
