"""Reference of a fused elementwise expression: evaluate it with torch in float32.

Optionally the first input is LayerNorm-ed over D (no affine) first: that is the adaLN family,
``LayerNorm(x) * (1 + scale) + shift`` and its variants (``LayerNorm(x) * scale + shift`` when the
``1 +`` was computed elsewhere, per-token scales, ...).
"""

import torch
import torch.nn.functional as F

import ditfx.kernels.expression as expression

from .._common import upcast
from .spec import check_inputs, parse_spec, result_dtype


def fused_elementwise_reference(
    expr: str, spec: str, inputs: list[torch.Tensor], layer_norm_eps: float | None = None
) -> torch.Tensor:
    """Evaluate ``expr`` over ``inputs`` in float32 (float64 for float64 inputs).

    Args:
        expr: the expression as written by :func:`ditfx.kernels.expression.to_text`.
        spec: input names and kinds, ``"x:full, scale:per_sample"`` (see ``spec.py``).
        inputs: one tensor per spec entry, in order.
        layer_norm_eps: when given, the first input (a full one) stands for its LayerNorm.

    Returns:
        ``(B, T, D)`` in the promoted dtype of the (non-0-d) inputs.
    """
    kinds = parse_spec(spec)
    tree = expression.parse(expr, list(kinds))
    B, T, D = check_inputs(kinds, inputs)
    values = {}
    for i, ((name, kind), t) in enumerate(zip(kinds.items(), inputs)):
        v = upcast(t)
        if kind == "per_sample":
            v = v.reshape(B, 1, D)  # (B, D) or (B, 1, D): broadcast over tokens
        if i == 0 and layer_norm_eps is not None:
            v = F.layer_norm(v, (D,), eps=layer_norm_eps)
        values[name] = v
    out = torch.as_tensor(expression.evaluate(tree, values)).to(result_dtype(inputs))
    if tree.is_Symbol or tuple(out.shape) != (B, T, D):
        # A custom op must not return (a view of) an input, and must return the full shape.
        out = out.expand(B, T, D).clone()
    return out
