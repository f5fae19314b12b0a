"""ditfx.models: reference model definitions."""

from ditfx.models.dit import DIT_CONFIGS, DiT, DiTConfig, build_dit, load_dit_checkpoint

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "build_dit", "load_dit_checkpoint"]
