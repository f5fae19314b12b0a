"""Digits sample quality: FD and class accuracy by the shipped classifier, PSNR and SSIM.

Definitions (images are (N, 1, 16, 16) tensors in [-1, 1]):

* ``fd``: Frechet distance between Gaussians fitted to the classifier's penultimate features
  (64-dim) of the given images and of the reference set, the 360 held-out real digits, which neither
  the DiT nor the classifier was trained on. It is biased upward for small N; compare numbers at
  equal N (``real_floor_fd`` gives the value real train-split digits reach at a given N).
* ``accuracy``: fraction of images the classifier assigns to the requested class.
* ``psnr`` / ``ssim`` (only with ``reference`` images, pairwise): means over images of
  scikit-image's peak_signal_noise_ratio and structural_similarity with data_range 2 (for [-1, 1]).
  SSIM uses Wang et al.'s settings (Gaussian weights, population covariance, K1=0.01, K2=0.03) with
  sigma 0.8 instead of 1.5, which makes a 7x7 window instead of 11x11: a 16x16 image has room for
  an 11x11 window at only 6x6 positions. The mean SSIM is over the 10x10 positions where a 7x7
  window fits. Identical images give psnr = inf and ssim = 1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .data import IMAGE_SIZE, NUM_CLASSES, held_out_split, train_split
from .shipped import load_classifier

DATA_RANGE = 2.0  # images span [-1, 1]
SSIM_SIGMA = (
    0.8  # scikit-image truncates at 3.5 sigma: radius int(3.5 * 0.8 + 0.5) = 3, a 7x7 window
)


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a clear error unless images is a float (N, 1, 16, 16) tensor with values in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    expected = (1, IMAGE_SIZE, IMAGE_SIZE)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{name} must have shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf")
    if images.numel() and (images.min() < -1.0 or images.max() > 1.0):
        raise ValueError(
            f"{name} must lie in [-1, 1] (got [{images.min().item():.3f}, "
            f"{images.max().item():.3f}]); clamp them first"
        )


def check_digit_labels(class_labels: torch.Tensor, count: int) -> None:
    if class_labels.ndim != 1 or len(class_labels) != count:
        raise ValueError(
            f"class_labels must have shape ({count},), got {tuple(class_labels.shape)}"
        )
    if count and (class_labels.min() < 0 or class_labels.max() >= NUM_CLASSES):
        raise ValueError(f"class_labels must be digits 0..{NUM_CLASSES - 1}")


@torch.no_grad()
def classifier_outputs(images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(features as float64 numpy (N, 64), predicted classes (N,)) from the shipped classifier."""
    classifier = load_classifier()
    features = classifier.features(images.detach().to("cpu", torch.float32))
    predictions = classifier.head(features).argmax(dim=1)
    return features.double().numpy(), predictions


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    tr((cov1 cov2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD
    matrix cov1^(1/2) cov2 cov1^(1/2), so two symmetric eigen-decompositions give it without the
    complex round-off that a general matrix square root of the non-symmetric cov1 cov2 produces.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


@lru_cache(maxsize=1)
def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the FD reference set: the held-out real digits."""
    features, _ = classifier_outputs(held_out_split().images)
    return gaussian_statistics(features)


def digits_fd(images: torch.Tensor) -> float:
    """FD of images against the held-out real digits (needs at least 2 images)."""
    check_images(images)
    if len(images) < 2:
        raise ValueError("the Frechet distance needs at least 2 images")
    features, _ = classifier_outputs(images)
    return frechet_distance(*gaussian_statistics(features), *reference_statistics())


def fd_between(images: torch.Tensor, other: torch.Tensor) -> float:
    """FD between two sets of images (e.g. a student's samples and its teacher's), in the same feature space."""
    check_images(images)
    check_images(other, "other")
    if min(len(images), len(other)) < 2:
        raise ValueError("the Frechet distance needs at least 2 images on each side")
    return frechet_distance(*gaussian_statistics(classifier_outputs(images)[0]),
                            *gaussian_statistics(classifier_outputs(other)[0]))


def real_floor_fd(count: int, seed: int = 0) -> float:
    """FD of `count` real train-split digits (seeded, class-balanced): the floor at N=count."""
    train = train_split()
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(train.labels == c).flatten() for c in range(NUM_CLASSES)]
    picks = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    # Interleave the shuffled classes (0, 1, ..., 9, 0, 1, ...) so any prefix is class-balanced.
    order = torch.stack([p[: min(len(p) for p in picks)] for p in picks], dim=1).flatten()
    return digits_fd(train.images[order[:count]])


def psnr_and_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Means over image pairs of PSNR (dB) and SSIM, as defined in the module docstring."""
    check_images(reference, "reference")
    if reference.shape != images.shape:
        raise ValueError(
            f"reference shape {tuple(reference.shape)} differs from images {tuple(images.shape)}"
        )
    a = images.detach().to("cpu", torch.float64).numpy()[:, 0]
    b = reference.detach().to("cpu", torch.float64).numpy()[:, 0]
    with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, by design
        psnr = [peak_signal_noise_ratio(r, x, data_range=DATA_RANGE) for x, r in zip(a, b)]
    ssim = [
        structural_similarity(
            x,
            r,
            data_range=DATA_RANGE,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
        )
        for x, r in zip(a, b)
    ]
    return float(np.mean(psnr)), float(np.mean(ssim))


def metrics(
    images: torch.Tensor, class_labels, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """{'fd', 'accuracy'} for the requested classes, plus {'psnr', 'ssim'} against reference."""
    check_images(images)
    class_labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
    check_digit_labels(class_labels, len(images))
    if len(images) < 2:
        raise ValueError("metrics need at least 2 images (the Frechet distance fits a covariance)")
    features, predictions = classifier_outputs(images)
    result = {
        "fd": frechet_distance(*gaussian_statistics(features), *reference_statistics()),
        "accuracy": (predictions == class_labels).double().mean().item(),
    }
    if reference is not None:
        result["psnr"], result["ssim"] = psnr_and_ssim(images, reference)
    return result
