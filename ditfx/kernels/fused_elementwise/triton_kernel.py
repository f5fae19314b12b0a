"""Launch the generated kernel of a fused elementwise expression (CUDA, or the interpreter).

The kernel source comes from :mod:`ditfx.kernels.codegen`, cached by a hash of the expression,
the input kinds and dtypes and the template; this module only maps the op's arguments onto it.
"""

import torch

import ditfx.kernels.codegen as codegen
import ditfx.kernels.expression as expression

from .spec import check_inputs, parse_spec, result_dtype


def fused_elementwise_launch(
    expr: str, spec: str, inputs: list[torch.Tensor], layer_norm_eps: float | None
) -> torch.Tensor:
    kinds = parse_spec(spec)
    tree = expression.parse(expr, list(kinds))
    B, _, D = check_inputs(kinds, inputs)
    # Generated launchers take per-sample operands as (B, D).
    tensors = [t.reshape(B, D) if k == "per_sample" else t for k, t in zip(kinds.values(), inputs)]
    dtypes = {name: t.dtype for name, t in zip(kinds, inputs)}
    out_dtype = result_dtype(inputs)
    if layer_norm_eps is None:
        return codegen.generate_elementwise(tree, kinds, dtypes, out_dtype)(*tensors)
    launch = codegen.generate_layer_norm_elementwise(tree, kinds, dtypes, out_dtype)
    return launch(*tensors, eps=layer_norm_eps)
