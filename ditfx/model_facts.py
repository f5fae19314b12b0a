"""What ditfx reads off the model itself rather than its captured graph: the repeated blocks (to tell a graph
that holds only part of the model) and the null class of a class-conditional model (the unconditional branch)."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`ditfx.optimize` knows of the model that the graph does not show."""

    null_class: int | None = None  # the class label of the unconditional branch, for class-conditional models
    blocks: tuple[str, ...] = ()  # the model's repeated blocks (module paths), to tell a partial graph

    @classmethod
    def of(cls, module: nn.Module) -> ModelFacts:
        return cls(null_class=null_class(module), blocks=tuple(repeated_blocks(module)))


def repeated_blocks(module: nn.Module) -> list[str]:
    """Module paths of the repeated blocks, outermost first: the classes the model declares in
    ``_repeated_blocks`` (diffusers' convention), else ``<container>.<i>`` siblings of one non-leaf class."""
    declared = set(getattr(module, "_repeated_blocks", ()) or ())
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, m in module.named_modules():
        match = re.match(r"^(.*)\.(\d+)$", name)
        cls = type(m).__name__
        if match and (cls in declared if declared else any(True for _ in m.children())):
            members[(match.group(1), cls)].append(name)
    groups = [paths for paths in members.values() if len(paths) >= 2]
    blocks = [p for paths in groups for p in paths]
    return [p for p in blocks if not any(p.startswith(q + ".") for q in blocks)]


def null_class(module: nn.Module) -> int | None:
    """The class label of the unconditional branch of a class-conditional model: its label embedder's extra
    row (facebookresearch/DiT's and diffusers' ``LabelEmbedding``: ``num_classes`` rows plus the null one)."""
    for m in module.modules():
        table, n = getattr(m, "embedding_table", None), getattr(m, "num_classes", None)
        if isinstance(table, nn.Embedding) and isinstance(n, int) and table.num_embeddings == n + 1:
            return n
    return None
