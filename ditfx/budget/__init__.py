"""Token-budget patching (FlexiDiT): early denoising steps at a coarser patch size.

Work in progress (issue 16): :mod:`ditfx.budget.resize` holds the weak mode's layer conversions (PI-resize of
the patch embedding, the de-embedding resize, sin-cos positions at coarse-patch centres). The pass that builds the
weak mode from a captured graph, the policy, the distillation and the schedule are not written yet.
"""
from ditfx.budget.resize import coarse_sincos_pos_embed, pi_resize, resize_deembed, resize_matrix

__all__ = ["coarse_sincos_pos_embed", "pi_resize", "resize_deembed", "resize_matrix"]
