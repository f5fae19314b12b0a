"""The classifier-free-guidance layout of a generation, determined from evidence, not assumed.

From the first evidence available:

1. the pipeline's names for its calls (``transformer.cache_context``): ``"cond"`` / ``"uncond"`` are the two
   calls of a step, ``"cond_uncond"`` one batched call;
2. the null class, where the model has one: the half (or call) whose class labels are all the null class is
   the unconditional one; a batch whose halves share latents but neither half is null is not guidance (one noise
   for two classes);
3. the config's ``uncond_first`` where the caller states it (a warning where the null class contradicts it);
4. otherwise diffusers' conventions: batched calls put the unconditional half first, two-call steps call the
   conditional branch first.

Without names, a batched layout is a call of 2B rows whose halves have equal latents, and a two-call layout two
calls of one step with equal latents. The evidence is checked again on every call: when the halves (or the two
calls) stop sharing latents, this was not guidance, and skipping stops for the generation with a warning, before
anything was filled (a first step always computes every row).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ditfx.runtime.policy import CallContext

NO_CFG = ("no classifier-free guidance found in the denoiser's calls (neither a batch whose halves share latents "
          "nor two calls per step with equal latents)")


@dataclass
class Layout:
    """What the evidence says of one generation's layout, and what it keeps until it knows."""

    kind: str | None = None  # "batched", "two_call", "none"; None: not known yet
    uncond_first: bool = True  # batched: the unconditional half is first; two-call: the unconditional call is
    named: bool = False  # two-call calls carry the pipeline's branch names
    half: int = 0  # B: samples per branch
    first_latents: torch.Tensor | None = None
    first_labels: torch.Tensor | None = None
    first_out: list | None = None  # outputs of the first call, until the layout is known
    step_latents: torch.Tensor | None = None  # two-call: the latents of this step's first call

    @property
    def guided(self) -> bool:
        return self.kind in ("batched", "two_call")


@dataclass(frozen=True)
class Found:
    """The layout became known at this call; ``first_call_done``: the step's first call ran before it was."""

    first_call_done: bool = False


class LayoutEvidence:
    """Reads the layout off each call: the pipeline's branch names, the null class, the stated order, the data."""

    def __init__(self, stated_uncond_first: bool | None, null_class: int | None, labels_pos: int | None,
                 warn: Callable[[str, str], None]):
        self.stated = stated_uncond_first
        self.null_class = null_class
        self.labels_pos = labels_pos
        self.warn = warn  # warn(key, message), once per key

    def observe(self, layout: Layout, ctx: CallContext) -> Found | None:
        """Update ``layout`` with this call's evidence (at the call's start); a :class:`Found` when it became known."""
        latents = ctx.input("latents")
        if layout.kind is None:
            return self._detect(layout, ctx, latents)
        if layout.kind != "none" and not self._still_guidance(layout, ctx, latents):
            self.not_guidance(layout, "the branches stopped sharing latents")
        return None

    def keep_first_outputs(self, layout: Layout, ctx: CallContext, outputs: list) -> None:
        """The generation's first call, while the layout is unknown: its outputs wait for the next call, which
        tells whether this step has two calls."""
        if layout.kind is None and ctx.info.step == 0 and ctx.info.index == 0:
            layout.first_out = list(outputs)

    def not_guidance(self, layout: Layout, why: str) -> None:
        if layout.kind not in (None, "none"):
            why = f"{why}; guidance skipping is off for the rest of this generation"
        else:
            why = f"{why}; guidance skipping is off for this generation"
        layout.kind = "none"
        layout.first_out = layout.first_latents = layout.first_labels = None
        self.warn(why, f"ditfx guidance: {why}")

    # ------------------------------------------------------------------------------------- detection
    def _labels(self, ctx: CallContext) -> torch.Tensor | None:
        if self.null_class is None or self.labels_pos is None:
            return None
        labels = ctx.args[self.labels_pos]
        return labels if isinstance(labels, torch.Tensor) and labels.dim() == 1 else None

    def _detect(self, layout: Layout, ctx: CallContext, latents: torch.Tensor) -> Found | None:
        info, name = ctx.info, ctx.info.branch
        rows = latents.shape[0]
        if name in ("cond", "uncond"):  # the pipeline names the two calls of a step
            layout.kind, layout.named, layout.half = "two_call", True, rows
            layout.uncond_first = name == "uncond" if info.index == 0 else name != "uncond"
            return Found(first_call_done=info.index > 0)
        if info.step > 0 or info.index > 1:  # a whole step went by with one call and no equal halves
            return self.not_guidance(layout, NO_CFG)
        labels = self._labels(ctx)
        if info.index == 0:
            h = rows // 2
            if rows % 2 == 0 and bool(torch.equal(latents[:h], latents[h:])):
                order = self._batched_order(labels, h, named=name == "cond_uncond")
                if order is None:
                    return self.not_guidance(layout, "the batch's halves share latents but neither half holds "
                                             "only the null class: one noise for several classes, not guidance")
                layout.kind, layout.half, layout.uncond_first = "batched", h, order
                return Found()
            if name == "cond_uncond":
                return self.not_guidance(layout, "the pipeline names a batched guidance call whose halves do not "
                                         "share latents")
            layout.first_latents, layout.first_labels = latents, labels
            return None
        if layout.first_latents is not None and layout.first_latents.shape == latents.shape and bool(
                torch.equal(layout.first_latents, latents)):
            layout.kind, layout.half = "two_call", rows
            order = self._two_call_order(layout.first_labels, labels)
            if order is None:
                return self.not_guidance(layout, "two calls share latents but neither holds only the null class")
            layout.uncond_first = order
            return Found(first_call_done=True)
        return self.not_guidance(layout, NO_CFG)

    def _batched_order(self, labels: torch.Tensor | None, h: int, named: bool) -> bool | None:
        """Whether the unconditional half comes first; None: the halves are not guidance."""
        parts = (labels[:h], labels[h:]) if labels is not None else None
        return self._order(parts, "half", default=True, named=named)

    def _two_call_order(self, first_labels, labels) -> bool | None:
        """Whether the unconditional call comes first; None: the two calls are not guidance."""
        parts = (first_labels, labels) if first_labels is not None and labels is not None else None
        return self._order(parts, "call", default=False, named=False)

    def _order(self, parts, what: str, default: bool, named: bool) -> bool | None:
        """The order from the null class in ``parts`` (the two halves' or calls' labels), else the stated one,
        else ``default`` (diffusers' convention); None when the data say it is not guidance."""
        stated = self.stated
        if parts is not None:
            first, second = (bool((p == self.null_class).all()) for p in parts)
            if first != second:
                if stated is not None and stated != first:
                    self.warn("order", f"ditfx guidance: uncond_first={stated} but the null class "
                              f"({self.null_class}) is in the {'first' if first else 'second'} {what}; "
                              "following the data")
                return first
            if not first and not named:
                return None
        return default if stated is None else stated

    def _still_guidance(self, layout: Layout, ctx: CallContext, latents: torch.Tensor) -> bool:
        """The layout's evidence, checked on every call: the halves (or the step's calls) share latents."""
        if layout.kind == "batched":
            h = layout.half
            return latents.shape[0] == 2 * h and bool(torch.equal(latents[:h], latents[h:]))
        if ctx.info.index == 0:
            layout.step_latents = latents
            return True
        return layout.step_latents is None or (layout.step_latents.shape == latents.shape
                                               and bool(torch.equal(layout.step_latents, latents)))
