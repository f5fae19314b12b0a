"""The weak (coarse-patch) mode's layers, converted from the native ones (FlexiDiT; shared/research/methods.md 3.2).

* :func:`resize_matrix`: B, the linear resize of a p x p patch to q x q (bilinear or bicubic), built by resizing
  each basis patch.
* :func:`pi_resize`: FlexiViT's pseudo-inverse resize of a patch-embedding kernel, ``w' = pinv(B^T) w``, so that
  ``<B x, w'> = <x, w>`` for every p x p patch x: a patch resized to q x q gives the token the patch gave.
* :func:`resize_deembed`: the de-embedding's weights (and bias) mapped to q x q outputs, ``W' = B W`` per
  channel: the coarse token decodes to the resized native patch.
* :func:`coarse_sincos_pos_embed`: the fixed 2-D sin-cos table evaluated at coarse-patch positions in native-grid
  units (ARD's ``get_2d_sincos_pos_embed`` convention ``s * i + s / 2``, s = q / p).

All computed in float64 and returned in the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ditfx.positional import MAX_PERIOD, sincos_1d

RESIZE_MODES = ("bilinear", "bicubic")


def resize_matrix(p: int, q: int, mode: str = "bilinear") -> torch.Tensor:
    """(q*q, p*p) float64: row-major q x q patch = B @ row-major p x p patch."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if p < 1 or q < 1:
        raise ValueError(f"patch sizes must be >= 1, got p={p}, q={q}")
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, 1, p, p)
    resized = F.interpolate(basis, size=(q, q), mode=mode, align_corners=False, antialias=False)
    return resized.reshape(p * p, q * q).T.contiguous()


def pi_resize(weight: torch.Tensor, q: int, mode: str = "bilinear") -> torch.Tensor:
    """A patch-embedding kernel ``(..., p, p)`` resized to ``(..., q, q)`` by pseudo-inverse resize."""
    p = weight.shape[-1]
    if weight.shape[-2] != p:
        raise ValueError(f"pi_resize takes square kernels (..., p, p), got {tuple(weight.shape)}")
    b = resize_matrix(p, q, mode)
    flat = weight.reshape(-1, p * p).double()
    return (flat @ torch.linalg.pinv(b.T).T).reshape(*weight.shape[:-2], q, q).to(weight.dtype)


def resize_deembed(weight: torch.Tensor, bias: torch.Tensor | None, p: int, q: int, channels: int,
                   layout: str = "ppc", mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final linear layer ``(p*p*channels, D)`` (and its bias) of a de-embedding, for q x q outputs.

    ``layout`` is the order of the output features: ``"ppc"`` (row, column, channel: the reference DiT's and
    diffusers' unpatchify) or ``"cpp"`` (channel, row, column).
    """
    if layout not in ("ppc", "cpp"):
        raise ValueError(f"layout must be 'ppc' or 'cpp', got {layout!r}")
    if weight.shape[0] != p * p * channels:
        raise ValueError(f"weight has {weight.shape[0]} outputs, expected p*p*channels = {p * p * channels}")
    b = resize_matrix(p, q, mode)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (p*p*C, ...) -> (q*q*C, ...)
        rest = t.shape[1:]
        t = t.double().reshape(p * p, channels, *rest) if layout == "ppc" else \
            t.double().reshape(channels, p * p, *rest).transpose(0, 1)
        out = torch.einsum("qp,pc...->qc...", b, t)
        out = out if layout == "ppc" else out.transpose(0, 1)
        return out.reshape(q * q * channels, *rest)

    new_weight = per_channel(weight).to(weight.dtype)
    new_bias = per_channel(bias).to(bias.dtype) if bias is not None else None
    return new_weight, new_bias


def coarse_sincos_pos_embed(dim: int, grid_size: int, stride: int) -> torch.Tensor:
    """(n*n, dim) float32 sin-cos table of a native ``grid_size`` grid coarsened by ``stride`` (n = grid_size /
    stride), at positions ``stride * i + stride / 2`` in native patch units (stride 1: the native table)."""
    if stride < 1 or grid_size % stride:
        raise ValueError(f"stride must divide the grid size {grid_size}, got {stride}")
    n = grid_size // stride
    coords = torch.arange(n, dtype=torch.float64) * stride + (stride / 2 if stride > 1 else 0.0)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    halves = [sincos_1d(cols.reshape(-1), dim // 2), sincos_1d(rows.reshape(-1), dim // 2)]
    return torch.cat(halves, dim=1).float()


def _sincos_angles_to_positions(sin: torch.Tensor, cos: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Positions (P,) from ``sin/cos(pos * omega_k)`` (P, K): read at the lowest frequency, then refined at each
    higher one (resolving whole turns), so the result has the precision of the highest."""
    angles = torch.atan2(sin, cos)  # (P, K), wrapped
    order = torch.argsort(omega)  # lowest frequency first
    pos = angles[:, order[0]] / omega[order[0]]
    for k in order[1:]:
        turns = torch.round((pos * omega[k] - angles[:, k]) / (2 * torch.pi))
        pos = (angles[:, k] + 2 * torch.pi * turns) / omega[k]
    return pos


def fit_sincos(table: torch.Tensor, grid: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """``(a_col, k_col, a_row, k_row)`` when ``table`` (h*w, D) is the fixed 2-D sin-cos table (column embedding in
    the first half of the channels, as the DiT and diffusers tables) at positions ``a + k * index``; else None."""
    h, w = grid
    n, dim = table.shape
    if n != h * w or dim % 4:
        return None
    t = table.double()
    quarter = dim // 4
    omega = 1.0 / MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    fits = []
    for half, index in ((0, torch.arange(n) % w), (1, torch.arange(n) // w)):
        part = t[:, half * dim // 2:(half + 1) * dim // 2]
        pos = _sincos_angles_to_positions(part[:, :quarter], part[:, quarter:], omega)
        x = index.double()
        design = torch.stack([torch.ones_like(x), x], dim=1)
        a, k = torch.linalg.lstsq(design, pos[:, None]).solution[:, 0].tolist()
        fits += [a, k]
    rebuilt = _sincos_table(fits, grid, 1, dim)
    scale = max(1.0, float(t.abs().max()))
    return tuple(fits) if float((rebuilt - t).abs().max()) <= 1e-4 * scale else None


def _sincos_table(fit, grid: tuple[int, int], stride: int, dim: int) -> torch.Tensor:
    a_col, k_col, a_row, k_row = fit
    h, w = grid[0] // stride, grid[1] // stride
    offset = stride / 2 if stride > 1 else 0.0  # coarse-patch centres in native units (ARD's convention)
    cols = a_col + k_col * (torch.arange(w, dtype=torch.float64) * stride + offset)
    rows = a_row + k_row * (torch.arange(h, dtype=torch.float64) * stride + offset)
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_1d(c.reshape(-1), dim // 2), sincos_1d(r.reshape(-1), dim // 2)], dim=1)


def coarse_table(table: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """A positional table (h*w, D) of a native grid, at the coarse grid (h/stride * w/stride, D): a fixed sin-cos
    table is evaluated at the coarse-patch centres (:func:`fit_sincos`), any other table (learned, or one this
    does not recognise) is resampled bilinearly at the coarse patches' centres."""
    h, w = grid
    if stride < 1 or h % stride or w % stride:
        raise ValueError(f"stride must divide the grid {h}x{w}, got {stride}")
    fit = fit_sincos(table, grid)
    if fit is not None:
        return _sincos_table(fit, grid, stride, table.shape[1]).to(table.dtype)
    image = table.double().T.reshape(1, table.shape[1], h, w)
    coarse = F.interpolate(image, size=(h // stride, w // stride), mode="bilinear", align_corners=False)
    return coarse.reshape(table.shape[1], -1).T.to(table.dtype)
