"""Kernel lowering (``Config(kernels=True)``): graph rewrites that replace matched DiT patterns with
``torch.ops.ditfx`` calls: :mod:`~ditfx.kernels.lowering.fusion` in the regions (adaLN, gated residuals, other
modulation chains), :mod:`~ditfx.kernels.lowering.cache_bookkeeping` in the variants the passes build."""
