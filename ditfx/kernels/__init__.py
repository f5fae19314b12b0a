"""ditfx.kernels: fused DiT operations as ``torch.ops.ditfx.*`` custom ops with Triton kernels.

Importing this package registers the ops. Each op folder holds ``reference.py`` (the semantics,
plain PyTorch), ``triton_kernel.py`` (kernel and launcher), ``op.py`` (``torch.library.triton_op``
registration and the public function). On non-CUDA tensors the ops run their reference, so
graphs that call them compile and export on CPU. See ``docs/kernels.md``.
"""

from .adaln_modulate import adaln_modulate
from .cache_residual import cache_residual, cache_residual_sums
from .fused_elementwise import fused_elementwise
from .gated_residual import gated_residual

#: Public function of each op, by op name (``torch.ops.ditfx.<name>``).
KERNELS = {
    "adaln_modulate": adaln_modulate,
    "gated_residual": gated_residual,
    "cache_residual": cache_residual,
}

__all__ = [
    "KERNELS",
    "adaln_modulate",
    "cache_residual",
    "cache_residual_sums",
    "fused_elementwise",
    "gated_residual",
]
