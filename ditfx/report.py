"""The one report type every pass returns (the region split and nested-region inlining included)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar


class TechniqueUnavailable(ValueError):
    """A pass cannot apply its technique to this graph (a model it cannot convert, an adapter made for another
    model): the technique is turned off for the graph with a warning that says why; the others stay on."""


class PassReport:
    """What a pass did, as text (``summary()``) and as data (``to_dict()``); subclasses are dataclasses."""

    pass_name: ClassVar[str] = "pass"

    def summary(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, **dataclasses.asdict(self)}
