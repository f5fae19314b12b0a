"""Loading the shipped digits weights (safetensors only) from the package's ``weights/`` folder, and the pipeline
of the trained DiT."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file

from .classifier import DigitsClassifier
from .pipeline import DigitsPipeline, make_scheduler

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = (
    "python -m ditfx.models.digits.train --out ditfx/models/digits/weights "
    "--steps 1500 --seed 0 --batch-size 64"
)
CLASSIFIER_COMMAND = "python -m ditfx.models.digits.classifier --out ditfx/models/digits/weights"


def shipped_file(name: str, command: str) -> Path:
    """The path of a shipped file, or a FileNotFoundError that says how to make it."""
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"digits model file {path} is missing; create it with: {command}")
    return path


def load_transformer(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiTTransformer2DModel:
    """The trained digits DiT (EMA weights) in eval mode."""
    config = DiTTransformer2DModel.load_config(shipped_file("config.json", TRAIN_COMMAND).parent)
    transformer = DiTTransformer2DModel.from_config(config)
    transformer.load_state_dict(load_file(shipped_file("model.safetensors", TRAIN_COMMAND)))
    if dtype != torch.float32:
        # Only cast when asked to: diffusers warns on every dtype cast, even float32 -> float32.
        transformer = transformer.to(dtype=dtype)
    return transformer.to(device=device).eval()


def teacher_pipeline(scheduler: str = "euler", device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> DigitsPipeline:
    """The digits pipeline of the trained DiT, with the "euler" or "dpm" scheduler (``digits.pipeline()``)."""
    return DigitsPipeline(transformer=load_transformer(device=device, dtype=dtype), scheduler=make_scheduler(scheduler))


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    """The metrics classifier on CPU in float32, eval mode (cached: shared, never trained)."""
    classifier = DigitsClassifier()
    classifier.load_state_dict(
        load_file(shipped_file("classifier.safetensors", CLASSIFIER_COMMAND))
    )
    return classifier.eval().requires_grad_(False)
