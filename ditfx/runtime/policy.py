"""The policy protocol: every technique is a policy on one mechanism.

A policy is built from its config and the :class:`~ditfx.plan.Plan`; it declares what it needs and keeps, and the
executor calls its hooks and never names a technique:

* ``slots``: the state it keeps, in declared :class:`StateSlot` s, reset on the event their scope names (a new
  generation; per branch means one value per branch of a step, also reset with the generation), per thread;
  ``per_row`` slots are seen through the rows the call computes, ``per_mode`` ones hold one value per mode;
* ``requires``: the call inputs it cannot work without (``"timestep"``, ``"latents"``, ``"labels"``: the roles
  the graph analysis gives), each with why. The pass manager checks them when it plans a graph: a graph without
  one turns the technique off for that graph, with a warning that says why (it is never a call-time error);
* ``Scratch``: a dataclass made fresh for each call (``ctx.scratch(self)``), for what one hook leaves the next;
* ``describe(steps)``: what it will do over a generation of ``steps`` uniform steps, as data (``ditfx inspect``);
* ``begin_call(ctx)``: before any region runs; may choose the rows the call computes (``ctx.rows``: guidance
  skipping drops unconditional rows; an empty tensor computes nothing);
* ``run_region(ctx, call, proceed)``: around each region, chained in order; a policy runs the region itself (a
  variant, on some rows, or not at all: ``call.reuse``) or hands it on with ``proceed(call)``. Several policies can
  act on one block;
* ``end_call(ctx, outputs)``: after the regions, in reverse order; returns the call's flat outputs (guidance
  fills the rows it did not compute).

A :class:`ModeSelector` chooses which mode of the model a call runs in (``choose_mode(ctx)``, before any region);
it sits outside the modes' chains: the executor asks it first and hands it the call's end (``end_call``) whatever
mode ran. Configs map to policies through :func:`register_policy` (each technique's ``policy.py``, imported with
its package), not isinstance chains.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ditfx.graph.regions import RegionModule
from ditfx.plan import ModeKey, Plan
from ditfx.runtime.lifecycle import CallInfo


@dataclass(frozen=True)
class StateSlot:
    """A piece of runtime state a policy declares: ``init(ctx)`` makes it when first used in its scope."""

    name: str
    init: Callable[[CallContext], Any]
    scope: Literal["generation", "branch"] = "generation"
    per_row: bool = False  # per sample of the call's rows: seen through the rows each call computes
    per_mode: bool = False  # one value per mode of the model: values shaped by the mode's graph


class CallContext:
    """One call as the policies see it."""

    def __init__(self, info: CallInfo, args: list, plan: Plan, store, records: dict, group=None):
        self.info = info
        self.group = group  # the context-parallel group (ditfx.runtime.parallel), None on one process
        self.mode: ModeKey | None = None  # None: the captured mode; else the mode a selector chose
        self.args = args
        self.plan = plan
        self.rows: torch.Tensor | None = None  # the call's rows to compute (None: all)
        self.nfe: float = 1.0  # network evaluations this call counts, per sample (a batched CFG call counts 2)
        self.nfe_skipped: float = 0.0
        self.mode_counts: dict[str, int] = {}  # what the call adds to its mode's stats beyond calls and FLOPs
        self._scratch: dict[str, Any] = {}
        self._store = store
        self._records = records

    def enter_mode(self, mode: ModeKey, plan: Plan, inputs: list) -> None:
        """The call runs in another mode: that mode's plan, with the inputs its graphs take after the call's."""
        self.mode, self.plan, self.args = mode, plan, [*self.args, *inputs]

    @property
    def full_rows(self) -> int | None:
        return self.plan.io.rows

    @property
    def computed_rows(self) -> int:
        """The rows the call computes (all of them unless a policy chose fewer)."""
        return self.full_rows or 1 if self.rows is None else len(self.rows)

    def scratch(self, policy: Policy):
        """``policy``'s scratch for this call: a fresh ``policy.Scratch()`` on first use."""
        value = self._scratch.get(policy.name)
        if value is None:
            if policy.Scratch is None:
                raise TypeError(f"{type(policy).__name__} declares no Scratch")
            value = self._scratch[policy.name] = policy.Scratch()
        return value

    def count(self, **counts: int) -> None:
        """Add to this call's mode's stats (``ditfx.stats(model).modes``)."""
        for k, v in counts.items():
            self.mode_counts[k] = self.mode_counts.get(k, 0) + v

    def group_sum(self, what: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``tensors`` (sums over this rank's tokens) summed over the context-parallel group: what a decision that
        every rank must take alike reads (``what`` names it in a timeout's error). The tensors themselves on one
        process."""
        return list(tensors) if self.group is None else self.group.sum(what, list(tensors))

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


class Policy(abc.ABC):
    """Base class: pass-through hooks. Subclasses set ``name`` (and what they declare), implement ``describe``
    and override the hooks they use; the config is ``self.config``."""

    name: ClassVar[str] = "policy"
    slots: ClassVar[tuple[StateSlot, ...]] = ()
    requires: ClassVar[Mapping[str, str]] = {}  # call input role -> why the policy cannot work without it
    Scratch: ClassVar[type | None] = None  # made fresh for each call: ctx.scratch(self)

    def __init__(self, config, plan: Plan):
        self.config = config
        self.plan = plan

    @abc.abstractmethod
    def describe(self, steps: int) -> dict:
        """What the policy will do over a generation of ``steps`` uniform steps (``{"kind": ..., ...}``)."""

    def begin_call(self, ctx: CallContext) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Before any region runs; may set ``ctx.rows``."""

    def run_region(self, ctx: CallContext, call: RegionCall, proceed: Callable[[RegionCall], list]) -> list:
        """Around one region: run it (a variant, some rows, or not at all) or hand it on with ``proceed``."""
        return proceed(call)

    def end_call(self, ctx: CallContext, outputs: list) -> list:
        """After the regions (reverse chain order): the call's flat outputs, completed."""
        return outputs


class ModeSelector(Policy):
    """A policy that chooses the mode each call runs in: asked before any region runs, outside the modes' chains
    (its ``begin_call`` and ``run_region`` are not called); its ``end_call`` follows every call, in any mode."""

    @abc.abstractmethod
    def choose_mode(self, ctx: CallContext) -> ModeKey | None:
        """The mode this call runs in, one of ``self.plan.modes``; None: the captured mode."""


_POLICIES: dict[type, type[Policy]] = {}


def register_policy(config_type: type):
    """Class decorator: ``config_type`` instances run as this policy."""

    def register(cls: type[Policy]) -> type[Policy]:
        _POLICIES[config_type] = cls
        return cls

    return register


def policy_class(config) -> type[Policy]:
    """The policy registered for ``config``'s type (a technique registers its policies in its ``policy.py``, which
    its package imports with its configs)."""
    try:
        return _POLICIES[type(config)]
    except KeyError:
        raise TypeError(f"no ditfx policy is registered for {type(config).__name__}: register one with "
                        "@register_policy(ConfigType)") from None


def policy_for(config, plan: Plan) -> Policy:
    return policy_class(config)(config, plan)
