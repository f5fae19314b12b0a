"""Classifier-free guidance combine with the per-sample cond/uncond cosine similarity."""

from .op import cfg_combine
from .reference import cfg_combine_reference

__all__ = ["cfg_combine", "cfg_combine_reference"]
