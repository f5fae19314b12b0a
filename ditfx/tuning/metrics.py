"""Generic output quality against the reference: PSNR and SSIM of image-like tensors, pairwise, as means."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 7, 1.5  # a 7x7 Gaussian window fits small latents and images alike


def psnr(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of 10 log10(range^2 / MSE), range the reference's max - min; equal samples give inf, an
    infinite error -inf, NaN outputs NaN."""
    a, b = outputs.detach().double().flatten(1), reference.detach().double().flatten(1)
    data_range = float(b.max() - b.min()) or 1.0
    mse = (a - b).pow(2).mean(dim=1)
    return float((10.0 * torch.log10(data_range ** 2 / mse)).mean())


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(outputs: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Mean SSIM (Wang et al., Gaussian window, K1 0.01, K2 0.03) of (N, C, H, W) outputs; None for other
    shapes or images smaller than the window."""
    if outputs.dim() != 4 or min(outputs.shape[-2:]) < SSIM_WINDOW:
        return None
    a, b = outputs.detach().double(), reference.detach().double()
    data_range = float(b.max() - b.min()) or 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA)
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, SSIM_WINDOW, SSIM_WINDOW)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])  # noqa: E731 - valid positions only
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def measure(outputs: torch.Tensor, reference: torch.Tensor, metric=None) -> dict[str, float]:
    """PSNR and SSIM of ``outputs`` against ``reference``, then what ``metric(outputs, reference)`` returns (its
    values take precedence: a model's own definition of PSNR or SSIM wins). Outputs with NaN or infinite values
    are not given to ``metric`` (it may not take them): ``"non_finite"`` counts those values instead, and puts
    the outputs outside any budget (``QualityBudget.misses``)."""
    if outputs.shape != reference.shape:
        raise ValueError(f"the run returned outputs of shape {tuple(outputs.shape)} where the reference run returned "
                         f"{tuple(reference.shape)}: run must return the same outputs for every configuration")
    result = {"psnr": psnr(outputs, reference)}
    value = ssim(outputs, reference)
    if value is not None:
        result["ssim"] = value
    non_finite = int((~torch.isfinite(outputs)).sum())
    if non_finite:
        result["non_finite"] = non_finite
    elif metric is not None:
        extra = metric(outputs, reference)
        if not isinstance(extra, dict):
            raise TypeError(f"QualityBudget.metric must return a dict of measures, got {type(extra).__name__}")
        result.update({k: float(v) for k, v in extra.items()})
    return result
