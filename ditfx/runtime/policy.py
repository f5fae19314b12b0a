"""The policy protocol: every technique is a policy on one mechanism.

A policy is built from its config and the :class:`~ditfx.plan.Plan` and declares its state; the executor calls
its hooks and never names a technique:

* ``begin_call(ctx)``: before any region runs; may choose the rows the call computes (``ctx.rows``: guidance
  skipping drops unconditional rows; an empty tensor computes nothing);
* ``run_region(ctx, call, proceed)``: around each region, chained in config order; a policy runs the region
  itself (a variant, on some rows, or not at all: ``call.reuse``) or hands it on with ``proceed(call)``. Several
  policies can act on one block;
* ``end_call(ctx, outputs)``: after the regions, in reverse order; returns the call's flat outputs (guidance
  fills the rows it did not compute).

State lives in declared :class:`StateSlot` s, reset on the event their scope names (a new generation; per branch
means one value per branch of a step, also reset with the generation), per thread; ``per_row`` slots are seen
through the rows the call computes. Configs map to policies through :func:`register_policy`, not isinstance
chains.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ditfx.graph.regions import RegionModule
from ditfx.plan import Plan
from ditfx.runtime.lifecycle import CallInfo


@dataclass(frozen=True)
class StateSlot:
    """A piece of runtime state a policy declares: ``init(ctx)`` makes it when first used in its scope."""

    name: str
    init: Callable[[CallContext], Any]
    scope: Literal["generation", "branch"] = "generation"
    per_row: bool = False  # per sample of the call's rows: seen through the rows each call computes
    per_mode: bool = False  # one value per mode (patch size): values shaped by the token count


class CallContext:
    """One call as the policies see it."""

    def __init__(self, info: CallInfo, args: list, plan: Plan, store, records: dict, mode: str | None = None):
        self.info = info
        self.mode = mode  # None: the native mode; else the name of the coarse mode this call runs in
        self.args = args
        self.plan = plan
        self.rows: torch.Tensor | None = None  # the call's rows to compute (None: all)
        self.nfe: float = 1.0  # network evaluations this call counts (a batched CFG call counts 2)
        self.nfe_skipped: float = 0.0
        self.scratch: dict[str, Any] = {}  # per call, per policy
        self._store = store
        self._records = records

    @property
    def full_rows(self) -> int | None:
        return self.plan.io.rows

    def input(self, role: str):
        pos = self.plan.io.position(role)
        return None if pos is None else self.args[pos]

    def state(self, policy: Policy, name: str):
        """The value of ``policy``'s slot ``name`` for this call (its branch, its rows)."""
        return self._store.get(policy, name, self)

    def record(self, name: str, value, latest_only: bool = False) -> None:
        """Keep ``value`` beyond the generation, for the API (calibration results; ``latest_only``: a trace of
        the last generation, which replaces the one before)."""
        if latest_only:
            self._records[name] = [value]
        else:
            self._records.setdefault(name, []).append(value)


@dataclass
class RegionCall:
    """One region about to run: its module and arguments, and how to run it."""

    rm: RegionModule
    args: list
    rows: int  # rows of this call's computation
    runner: Any  # the executor's variant runner
    ran_rows: int = field(default=-1)  # set by what actually ran (0: reused)
    extra_flops: int = field(default=0)  # work a variant adds over the region's own cost (history keys)

    @property
    def region(self):
        return self.rm.region

    def run(self, transforms: tuple[str, ...] = (), args: list | None = None) -> tuple:
        """Run a variant of the region on all of the call's rows."""
        self.ran_rows = self.rows
        return self.runner.run(self.rm, transforms, self.args if args is None else args, self.rows)

    def run_on_rows(self, transforms: tuple[str, ...], args: list, ids: torch.Tensor) -> tuple | None:
        """Run a variant on rows ``ids`` only (outputs in that order), or None where no smaller graph serves."""
        result = self.runner.run_on_rows(self.rm, transforms, args, self.rows, ids)
        if result is None:
            return None
        outs, self.ran_rows = result
        return outs

    def reuse(self, outs: list) -> list:
        """The region did not run: ``outs`` stand for its outputs."""
        self.ran_rows = 0
        return outs


class Policy:
    """Base class: pass-through hooks. Subclasses set ``name`` and ``slots`` and override what they use."""

    name: ClassVar[str] = "policy"
    slots: ClassVar[tuple[StateSlot, ...]] = ()

    def __init__(self, config, plan: Plan):
        self.config = config
        self.plan = plan

    def choose_mode(self, info: CallInfo) -> str | None:
        """The mode this call runs in (a policy that chooses modes answers; None: no opinion, native)."""
        return None

    def begin_call(self, ctx: CallContext) -> None:
        pass

    def run_region(self, ctx: CallContext, call: RegionCall, proceed: Callable[[RegionCall], list]) -> list:
        return proceed(call)

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        return outputs


_POLICIES: dict[type, type[Policy]] = {}


def register_policy(config_type: type):
    """Class decorator: ``config_type`` instances run as this policy."""

    def register(cls: type[Policy]) -> type[Policy]:
        _POLICIES[config_type] = cls
        return cls

    return register


BUILTIN = ("ditfx.runtime.block_cache", "ditfx.runtime.guidance", "ditfx.runtime.budget", "ditfx.runtime.history")  # modules that register ditfx's own policies


def policy_for(config, plan: Plan) -> Policy:
    for module in BUILTIN:
        importlib.import_module(module)
    try:
        cls = _POLICIES[type(config)]
    except KeyError:
        raise TypeError(f"no ditfx policy is registered for {type(config).__name__}") from None
    return cls(config, plan)
