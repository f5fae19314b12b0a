"""A weak-mode adapter: the tensors a coarse patch size needs (embedding kernel, positional table, de-embedding,
optional LoRA on the blocks' linears) and the record of how they were made, in one safetensors file.

The file holds the tensors under their names (``embed.weight``, ``pos_embed``, ``deembed.weight``,
``deembed.bias``, ``lora.<module>.down`` / ``.up``) and, in its metadata, the format version, the patch sizes,
the LoRA rank, the time scale of the model's timestep, the shape of the model it was made for and the record
(how it was trained: steps, minutes, the loss curve).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditfx.report import TechniqueUnavailable
from ditfx.validation import same_fields

FORMAT = "ditfx.budget-adapter/1"


class AdapterError(TechniqueUnavailable):
    """An adapter file or an adapter that does not fit the model; the message names the file or the tensor."""


@dataclass
class BudgetAdapter:
    """The weak mode at ``patch`` of a model whose native patch size is ``native_patch``."""

    FILE_SUFFIX = ".safetensors"  # how a plan saves it beside its policies

    patch: int
    native_patch: int
    tensors: dict[str, torch.Tensor]
    lora_rank: int = 0
    time_scale: float = 1000.0  # the model's timestep at noise level 1
    model: dict = field(default_factory=dict)  # what it was made for: class, grid, width, blocks
    record: dict = field(default_factory=dict)  # how it was made

    __eq__ = same_fields  # the tensors compare by value

    @property
    def zero_shot(self) -> bool:
        return bool(self.record.get("zero_shot"))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def check(self, shapes: dict[str, tuple[int, ...]], source: str = "the adapter") -> None:
        """Raise :class:`AdapterError` unless the tensors are exactly the ones a weak graph takes."""
        missing = sorted(set(shapes) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(shapes))
        if missing or extra:
            raise AdapterError(f"{source} does not fit this model at patch size {self.patch}: missing "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                               f"{extra[:4]}{'...' if len(extra) > 4 else ''} "
                               f"(made for {self.model or 'an unknown model'};"
                               " distil one for this model with ditfx.budget.distill)")
        for key, shape in shapes.items():
            if tuple(self.tensors[key].shape) != tuple(shape):
                raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(self.tensors[key].shape)}, this "
                                   f"model's weak mode takes {tuple(shape)}")

    def save(self, path) -> Path:
        """Write ``path`` (a ``.safetensors`` file; a directory gets ``adapter.safetensors``)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "adapter.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "patch": str(self.patch), "native_patch": str(self.native_patch),
                    "lora_rank": str(self.lora_rank), "time_scale": repr(float(self.time_scale)),
                    "model": json.dumps(self.model), "record": json.dumps(self.record)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(path), metadata)
        return path

    @classmethod
    def load(cls, path) -> BudgetAdapter:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "adapter.safetensors"
        if not path.is_file():
            raise AdapterError(f"no budget adapter at {path}: pass the .safetensors file written by "
                               "ditfx.budget.distill (or BudgetAdapter.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a corrupt file: say which
            raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e
        if meta.get("format") != FORMAT:
            raise AdapterError(f"{path} is not a ditfx budget adapter (format {meta.get('format')!r}, expected "
                               f"{FORMAT!r})")
        try:
            return cls(patch=int(meta["patch"]), native_patch=int(meta["native_patch"]), tensors=tensors,
                       lora_rank=int(meta["lora_rank"]), time_scale=float(meta["time_scale"]),
                       model=json.loads(meta["model"]), record=json.loads(meta["record"]))
        except (KeyError, ValueError) as e:
            raise AdapterError(f"{path}: adapter metadata field {e} is missing or malformed") from e
