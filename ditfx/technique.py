"""The technique interface: what a technique gives the compiler (:class:`Technique`), how it is registered (a
field of :class:`ditfx.Config` made by :func:`technique_field`), and what the pass manager hands its pass
(:class:`PassContext`).

A technique is one folder, ``ditfx/<name>/``: its knobs (config dataclasses and their model check), its fitted
data, its graph variants (``offer``, the pass), its policy (``@register_policy`` in its ``policy.py``) and its
training or calibration; its record is the folder's ``TECHNIQUE``. One line registers it, a field of ``Config``::

    cache: DynamicCache | StaticCache | None = technique_field(cache.TECHNIQUE)

and everything that used to keep its own table reads the registered techniques from the fields: the pass manager
(which passes run, in what order), the policy chain, the config codec (files), the model checks, torch.compile's
dict options and the fallback warning that names what was turned off.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ditfx.model_facts import ModelFacts
from ditfx.plan import Plan
from ditfx.report import PassReport
from ditfx.validation import WrongType


@dataclass(frozen=True)
class Technique:
    """One technique, as the compiler sees it.

    ``offer(plan, config, ctx)`` is its pass: it registers the graph variants its policy runs (named transforms
    and the regions that offer them, or other modes of the model) and returns a report; it raises
    :class:`~ditfx.report.TechniqueUnavailable` when it cannot apply to a graph (the technique is then off for that
    graph, with a warning). ``order``: where its policy chains (lower first): the mode is chosen first, then the
    rows a call computes, then what runs of each block. ``check_model(config, module, facts)`` checks a config
    against the model before anything is compiled.
    """

    name: str  # the Config field that holds its config
    configs: tuple[type, ...]  # the config classes users set that field to
    offer: Callable[[Plan, Any, PassContext], PassReport]
    order: int
    example: str  # how to build one, for error messages: "ditfx.DynamicCache(threshold=0.1)"
    internal: tuple[type, ...] = ()  # configs ditfx's own tools set (calibration recordings), not documented
    check_model: Callable[[Any, Any, ModelFacts], None] | None = None
    # torch.compile's dict forms: kind -> config class, the first the default
    options: Mapping[str, type] = field(default_factory=dict)
    option_examples: Mapping[str, str] = field(default_factory=dict)  # kind -> an example dict form
    conflicts: Mapping[str, str] = field(default_factory=dict)  # techniques it cannot run with -> why

    def accepts(self, config: Any) -> bool:
        return isinstance(config, self.configs + self.internal)

    def check_type(self, config: Any, owner: str = "Config") -> None:
        """Raise :class:`~ditfx.validation.WrongType` unless ``config`` is one of this technique's configs (the
        field ``name`` of ``owner``, a Config class)."""
        if config is None or self.accepts(config):
            return
        allowed = ", ".join(f"ditfx.{c.__name__}" if c.__module__.startswith("ditfx.") else c.__name__
                            for c in self.configs)
        dict_form = (f" (torch.compile options take a dict, {next(iter(self.option_examples.values()))})"
                     if self.option_examples else "")
        raise WrongType(f"{owner}.{self.name} must be {allowed} or None, got {config!r} ({type(config).__name__}): "
                        f"build one, e.g. {self.example}{dict_form}")

    def from_option(self, spec: dict) -> Any:
        """The config of its dict form in torch.compile options: ``{"kind": ..., **fields}`` (kind optional)."""
        spec = dict(spec)
        kinds = dict(self.options)
        default = next(iter(kinds))
        kind = spec.pop("kind", default)
        name = self.name
        if not isinstance(kind, str) or kind not in kinds:
            names = (" or ".join(map(repr, kinds)) if len(kinds) == 2 else "one of " + ", ".join(map(repr, kinds)))
            raise ValueError(f"options[{name!r}]: {name} kind must be {names}, got {kind!r} "
                             f"(e.g. {self.option_examples.get(default, self.example)})")
        cls = kinds[kind]
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        unknown = sorted(map(str, set(spec) - set(known)))
        if unknown:
            raise ValueError(f"options[{name!r}] of kind {kind!r} ({cls.__name__}) has unknown key(s) {unknown}; "
                             f"known: {['kind', *known]}")
        missing = [f.name for f in fields if f.name not in spec
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"options[{name!r}] of kind {kind!r} ({cls.__name__}) needs {missing}, "
                             f"e.g. {self.option_examples.get(kind, self.example)}")
        return cls(**spec)


def technique_field(technique: Technique) -> Any:
    """The :class:`ditfx.Config` field that registers ``technique``: its config, or None (off)."""
    return field(default=None, metadata={"technique": technique})


def registered(config_class: type) -> list[Technique]:
    """The techniques registered by the fields of ``config_class`` (:class:`ditfx.Config` or a subclass), in
    field order."""
    found = []
    for f in dataclasses.fields(config_class):
        technique = f.metadata.get("technique")
        if technique is None:
            continue
        if technique.name != f.name:
            raise TypeError(f"{config_class.__name__}.{f.name} registers the technique {technique.name!r}: name "
                            "the field after its technique")
        found.append(technique)
    return found


@dataclass
class PassContext:
    """What the pass manager hands a technique's pass besides the plan and its config."""

    example_inputs: list | None = None  # the captured call's inputs (weights included), where the caller has them
    facts: ModelFacts = field(default_factory=ModelFacts)
    # a kernel lowering for the variants a pass builds (kernels on): the regions were lowered before the passes
    lower: Callable[[fx.GraphModule, str], fx.GraphModule] | None = None
    # plans a rewritten graph of the model (another mode) with every other technique of the config
    plan_graph: Callable[[fx.GraphModule, set[str]], Plan] | None = None
