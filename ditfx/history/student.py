"""A distilled few-step student: its weights, step heads, the schedule it was trained for, and its record.

One safetensors file: the model's state dict under ``model.<name>``, the step heads under ``heads.weight`` /
``heads.bias``, and in the metadata the format version, the model class, the history layers, the step count,
the student's noise levels and the record (how it was trained: the teacher, the loss curves, the command).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditfx.history.config import HistoryAttention

FORMAT = "ditfx.history-student/1"


@dataclass
class HistoryStudent:
    state: dict[str, torch.Tensor]  # the student model's state dict
    layers: int  # blocks with history attention (0: step distillation)
    steps: int
    sigmas: list[float]  # the noise level each step starts at (the pipeline's ``sigmas=``)
    heads: dict[str, torch.Tensor] | None = None  # {"weight": (S, out, in), "bias": (S, out)}
    record: dict = field(default_factory=dict)
    model_class: str = ""

    def history(self) -> HistoryAttention:
        """The config that runs this student: ``ditfx.Config(history=student.history())``."""
        return HistoryAttention(self.layers, self.steps, heads=self.heads)

    def model(self, architecture: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``architecture`` (the teacher, or any model of its class) with the student's weights."""
        if self.model_class and type(architecture).__name__ != self.model_class:
            raise ValueError(f"this student was distilled from a {self.model_class}, not a "
                             f"{type(architecture).__name__}")
        student = copy.deepcopy(architecture)
        student.load_state_dict(self.state)
        return student.eval().requires_grad_(False)

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.state.items()}
        if self.heads is not None:
            tensors.update({f"heads.{k}": v.detach().contiguous().cpu() for k, v in self.heads.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "model_class": self.model_class, "layers": str(self.layers),
                    "steps": str(self.steps), "sigmas": json.dumps(self.sigmas), "record": json.dumps(self.record)}
        save_file(tensors, str(path), metadata)
        return path

    @classmethod
    def load(cls, path) -> HistoryStudent:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no student file at {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a ditfx history student (format {meta.get('format')!r}, expected "
                                 f"{FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        heads = {k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")} or None
        return cls(state, int(meta["layers"]), int(meta["steps"]), json.loads(meta["sigmas"]), heads,
                   json.loads(meta.get("record", "{}")), meta.get("model_class", ""))
