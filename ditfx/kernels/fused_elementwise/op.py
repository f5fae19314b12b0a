"""Registration of ``torch.ops.ditfx.fused_elementwise`` and its public entry point."""

from collections.abc import Mapping, Sequence

import sympy
import torch

import ditfx.kernels.expression as expression

from .reference import fused_elementwise_reference
from .spec import check_inputs, format_spec


@torch.library.triton_op("ditfx::fused_elementwise", mutates_args=())
def _fused_elementwise_op(
    expr: str, spec: str, inputs: list[torch.Tensor], layer_norm_eps: float | None = None
) -> torch.Tensor:
    # Triton cannot trace without a GPU driver, so non-CUDA tensors take the reference.
    if inputs[0].device.type != "cuda":
        return fused_elementwise_reference(expr, spec, inputs, layer_norm_eps)
    # Imported here: triton is a Linux-only dependency and the CPU path must not need it.
    from .triton_kernel import fused_elementwise_launch

    return fused_elementwise_launch(expr, spec, inputs, layer_norm_eps)


def fused_elementwise(
    expr: sympy.Expr | str,
    kinds: Mapping[str, str],
    inputs: Sequence[torch.Tensor],
    layer_norm_eps: float | None = None,
) -> torch.Tensor:
    """Evaluate an elementwise expression in one generated kernel.

    Args:
        expr: sympy expression (or its :func:`~ditfx.kernels.expression.to_text` text) over
            the names in ``kinds``.
        kinds: input name -> broadcast kind (``"full"`` ``(B, T, D)``, ``"per_sample"``
            ``(B, D)`` / ``(B, 1, D)``, ``"per_token"`` ``(B, T, 1)``, ``"scalar"`` ``()``), in
            the order of ``inputs``.
        inputs: the tensors, float32/float16/bfloat16; arithmetic is float32.
        layer_norm_eps: when given, the first input (full) is replaced by its LayerNorm over D
            (no affine) before the expression reads it.

    Returns:
        ``(B, T, D)`` in the promoted dtype of the non-0-d inputs.
    """
    text = expr if isinstance(expr, str) else expression.to_text(expr)
    # The text is parsed inside the op (Dynamo cannot trace sympy's parser; AOT tracing of the
    # op body runs it as plain Python).
    check_inputs(kinds, inputs)
    if layer_norm_eps is not None and next(iter(kinds.values())) != "full":
        raise ValueError("with layer_norm_eps the first input is normalised and must be 'full'")
    return torch.ops.ditfx.fused_elementwise.default(
        text, format_spec(kinds), list(inputs), layer_norm_eps
    )
