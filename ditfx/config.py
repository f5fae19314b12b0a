"""What ditfx does to a model: :class:`Config`, one field per technique (each field registers its technique) plus
the compiler settings, validated on construction. Each technique's own knobs live in its folder
(``ditfx/cache/config.py``, ...); files are written and read by :mod:`ditfx.config_io`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditfx.budget import TECHNIQUE as BUDGET
from ditfx.budget.config import TokenBudget
from ditfx.cache import TECHNIQUE as CACHE
from ditfx.cache.config import CacheCalibration, DynamicCache, StaticCache
from ditfx.guidance import TECHNIQUE as GUIDANCE
from ditfx.guidance.config import AdaptiveGuidance, GuidanceRecording, GuidanceWindow, LinearAG
from ditfx.history import TECHNIQUE as HISTORY
from ditfx.history.config import HistoryAttention
from ditfx.model_facts import ModelFacts
from ditfx.technique import Technique, registered, technique_field
from ditfx.validation import WrongType, check_bool, check_choice, require

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILED_REGIONS = ("blocks", "all")


@dataclass(frozen=True)
class Config:
    """What ditfx does to a model.

    The technique fields (``cache``, ``guidance``, ``budget``, ``history``) each hold their technique's config, or
    None (off). ``compiler`` is the inner backend that compiles the regions. ``compile_regions="blocks"`` compiles
    the repeated blocks (one artifact per block structure) and runs the small prologue and epilogue as their
    captured FX graphs, as regional compilation does, which keeps the first call's compile time at that of
    compiling one block; ``"all"`` compiles the prologue and epilogue too (two more compiles).
    """

    # each technique field registers its technique (ditfx/technique.py): one line per technique
    cache: DynamicCache | StaticCache | CacheCalibration | None = technique_field(CACHE)
    guidance: AdaptiveGuidance | GuidanceWindow | LinearAG | GuidanceRecording | None = technique_field(GUIDANCE)
    compiler: str = "inductor"
    compile_regions: str = "blocks"
    kernels: bool = False  # lower adaLN / gated-residual patterns to torch.ops.ditfx kernels (kernels/lowering)
    budget: TokenBudget | None = technique_field(BUDGET)
    history: HistoryAttention | None = technique_field(HISTORY)
    # how ditfx.tune chose this config (budget, measured front, held-out check); JSON-able, not part of equality
    tuning: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (self.tuning is None or isinstance(self.tuning, dict)):
            raise WrongType(f"Config.tuning is the record ditfx.tune writes (a dict) or None, got "
                            f"{type(self.tuning).__name__}")
        check_bool("Config", "kernels", self.kernels,
                   hint=" (lower adaLN / gated-residual patterns to ditfx kernels)")
        check_choice("Config", "compiler", self.compiler, INNER_BACKENDS,
                     f"unknown inner backend {self.compiler!r}: use one of {', '.join(INNER_BACKENDS)}")
        check_choice("Config", "compile_regions", self.compile_regions, COMPILED_REGIONS,
                     f"Config.compile_regions must be one of {COMPILED_REGIONS}, got {self.compile_regions!r}")
        for technique in self.registered():
            technique.check_type(getattr(self, technique.name), type(self).__name__)
        for technique, _ in self.techniques():
            for other, why in technique.conflicts.items():
                require(getattr(self, other, None) is None,
                        f"Config.{technique.name} and Config.{other} cannot be combined: {why}; drop one of them")

    @classmethod
    def registered(cls) -> list[Technique]:
        """The techniques this config class registers (its technique fields), in the order their policies chain."""
        return sorted(registered(cls), key=lambda t: t.order)

    def techniques(self) -> list[tuple[Technique, Any]]:
        """(technique, its config) of every technique this config turns on, in the order their policies chain."""
        return [(t, getattr(self, t.name)) for t in self.registered() if getattr(self, t.name) is not None]

    def check_model(self, module) -> None:
        """Every check of this config that needs the model ``module`` (the denoiser, not a pipeline), before
        anything is compiled; raises ValueError (TypeError for a wrong argument type)."""
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"check_model needs the denoiser nn.Module, got {type(module).__name__}")
        facts = ModelFacts.of(module)
        for technique, cfg in self.techniques():
            if technique.check_model is not None:
                technique.check_model(cfg, module, facts)

    def save(self, path) -> Path:
        """Write this config as versioned JSON (``.json``; schedule and adapter files beside it)."""
        from ditfx.config_io import save_config

        return save_config(self, path)

    @classmethod
    def load(cls, path) -> Config:
        """Read a config written by :meth:`save` or ``ditfx.tune`` (``ditfx tune MODEL --out PATH``)."""
        from ditfx.config_io import load_config

        return load_config(path, cls)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Config:
        """Build from ``torch.compile(..., backend="ditfx", options={...})``.

        Accepts ``{"config": Config}`` or plain fields: ``{"compiler": "aot_eager",
        "cache": {"kind": "dynamic", "threshold": 0.1}}``. A technique given as a dict is ``{"kind": ..., **fields}``:
        ``cache`` kind ``"dynamic"`` (the default) or ``"static"``; ``guidance`` ``"adaptive"`` (the default),
        ``"window"`` or ``"linear"``; ``budget`` and ``history`` have one kind each, so ``kind`` may be left out;
        the other keys are the fields of that class.
        """
        if options is not None and not isinstance(options, dict):
            raise WrongType(f"ditfx options must be a dict, got {type(options).__name__}: pass e.g. "
                            "options={'compiler': 'inductor', 'cache': {'kind': 'dynamic', 'threshold': 0.1}}")
        options = dict(options or {})
        if "config" in options:
            config = options.pop("config")
            require(not options, f"pass either 'config' or fields, not both: {sorted(options)}")
            require(isinstance(config, Config), f"options['config'] must be a ditfx.Config, got {config!r}")
            return config
        known = {f.name for f in dataclasses.fields(cls)} - {"tuning"}
        unknown = set(options) - known
        require(not unknown, f"unknown ditfx option(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
        for technique in cls.registered():
            if isinstance(options.get(technique.name), dict):
                options[technique.name] = technique.from_option(options[technique.name])
        return cls(**options)
