"""The input spec of a fused-elementwise op: input names and broadcast kinds, as one string.

torch.library schemas have no ``str[]``, so the names and kinds travel as ``"x:full,
scale:per_sample"``; the order is the order of the op's tensor inputs.
"""

from collections.abc import Mapping, Sequence

import torch

from ..codegen import KINDS


def format_spec(kinds: Mapping[str, str]) -> str:
    """``{"x": "full", "scale": "per_sample"}`` -> ``"x:full, scale:per_sample"``."""
    return ", ".join(f"{name}:{kind}" for name, kind in kinds.items())


def parse_spec(spec: str) -> dict[str, str]:
    """Inverse of :func:`format_spec`; raises ``ValueError`` for an unknown kind."""
    kinds = {}
    for item in spec.split(","):
        name, _, kind = item.strip().partition(":")
        if kind not in KINDS or not name.isidentifier():
            raise ValueError(f"bad input spec item {item.strip()!r}: want name:kind, kind in {KINDS}")
        kinds[name] = kind
    return kinds


def check_inputs(kinds: Mapping[str, str], inputs: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """Raise ``ValueError`` unless each tensor has its kind's shape; return ``(B, T, D)``.

    Shapes: full ``(B, T, D)``, per_sample ``(B, D)`` or ``(B, 1, D)``, per_token ``(B, T, 1)``,
    scalar ``()``; the first full input gives ``(B, T, D)``.
    """
    if len(kinds) != len(inputs):
        raise ValueError(f"{len(kinds)} inputs in the spec, {len(inputs)} tensors given")
    unknown = {n: k for n, k in kinds.items() if k not in KINDS}
    if unknown:
        raise ValueError(f"unknown input kind(s) {unknown}: use one of {KINDS}")
    fulls = [t for kind, t in zip(kinds.values(), inputs) if kind == "full"]
    if not fulls or fulls[0].dim() != 3:
        raise ValueError("the first 'full' input must be (B, T, D)")
    B, T, D = fulls[0].shape
    allowed = {
        "full": [(B, T, D)],
        "per_sample": [(B, D), (B, 1, D)],
        "per_token": [(B, T, 1)],
        "scalar": [()],
    }
    for (name, kind), t in zip(kinds.items(), inputs):
        if tuple(t.shape) not in allowed[kind]:
            raise ValueError(f"{name} ({kind}) must have shape in {allowed[kind]}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return B, T, D


def result_dtype(inputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype eager PyTorch gives the expression: promotion over the non-0-d inputs.

    (0-d tensors do not raise the dtype of dimensioned floating-point tensors.)
    """
    dims = [t.dtype for t in inputs if t.dim() > 0] or [t.dtype for t in inputs]
    dtype = dims[0]
    for d in dims[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype
