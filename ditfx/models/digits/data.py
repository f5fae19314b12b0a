"""The real digits: scikit-learn's bundled ``load_digits`` as 16x16 images in [-1, 1].

The 1,797 8x8 scans (values 0..16, ten classes) ship inside scikit-learn, so nothing is downloaded.
They are upsampled to 16x16 with bilinear interpolation: with the DiT's patch size of 2 that gives
an 8x8 grid of 64 tokens, and bilinear (unlike nearest-neighbour) makes the four pixels of a patch
differ, so the model has real within-patch structure to predict rather than 2x2 constant blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 16
NUM_CLASSES = 10
# The one split that the DiT, the classifier and the metrics all use.
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and their labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def upsample_and_scale(raw: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) scans with values 0..16 -> (N, 1, 16, 16) float32 in [-1, 1]."""
    images = torch.as_tensor(raw, dtype=torch.float32)[:, None] / 8.0 - 1.0
    images = F.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    # Bilinear interpolation is a convex combination, so the range stays [-1, 1]; clamp rounding.
    return images.clamp(-1.0, 1.0)


def all_digits() -> DigitsSplit:
    """All 1,797 digits, in scikit-learn's order."""
    bunch = load_digits()
    return DigitsSplit(
        upsample_and_scale(bunch.images), torch.as_tensor(bunch.target, dtype=torch.int64)
    )


def train_and_held_out() -> tuple[DigitsSplit, DigitsSplit]:
    """The fixed stratified 80/20 split (1,437 train, 360 held out)."""
    digits = all_digits()
    indices = np.arange(len(digits))
    train_idx, held_out_idx = train_test_split(
        indices,
        test_size=HELD_OUT_FRACTION,
        stratify=digits.labels.numpy(),
        random_state=SPLIT_SEED,
    )
    train_idx, held_out_idx = np.sort(train_idx), np.sort(held_out_idx)
    return (
        DigitsSplit(digits.images[train_idx], digits.labels[train_idx]),
        DigitsSplit(digits.images[held_out_idx], digits.labels[held_out_idx]),
    )


def train_split() -> DigitsSplit:
    return train_and_held_out()[0]


def held_out_split() -> DigitsSplit:
    return train_and_held_out()[1]
