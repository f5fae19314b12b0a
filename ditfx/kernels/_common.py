"""Shape and dtype helpers shared by the references, the launchers and the public functions."""

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` in its accumulation dtype: float32 for 16-bit floats, unchanged for float32/64.

    References compute in this dtype, so passing float64 inputs turns a reference into a float64
    oracle for the tests.
    """
    return t.to(torch.promote_types(t.dtype, torch.float32))


def modulation_view(v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """View a per-sample ``(B, D)`` / ``(B, 1, D)`` or per-token ``(B, T, D)`` tensor as ``shape``.

    The result is an expanded view (stride 0 over tokens for per-sample inputs), so kernels read
    each modulation row through strides instead of materialising the broadcast.
    """
    if v.dim() == 2:
        v = v.unsqueeze(1)
    return v.expand(shape)


def check_modulation(name: str, v: torch.Tensor, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``v`` is a per-sample or per-token modulation for ``x``."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if tuple(v.shape) not in ((B, D), (B, 1, D), (B, T, D)):
        raise ValueError(
            f"{name} must be (B, D), (B, 1, D) or (B, T, D) = {(B, T, D)}, got {tuple(v.shape)}"
        )


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless all tensors have the same shape and at least one dimension."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) == 0 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected equal shapes (B, ...), got {shapes}")
