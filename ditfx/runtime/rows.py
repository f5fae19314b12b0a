"""Calls that compute only some of their rows: the one bucket rule of row counts, and per-row state.

A policy may have a call compute a subset of its rows (guidance skipping drops the unconditional rows of samples
whose guidance has ended; a per-sample cache runs a block only for the samples that need it). Every row count a
region then runs on is a bucket of :func:`bucket`: a multiple of an eighth of the captured rows, so a changing
subset compiles (or, in a package without a dynamic batch, ships) at most eight graphs per variant. The
executor, the policies and the package use this one rule.

Policy state kept per row (cached residuals, references, reuse counters): :class:`RowState` keeps it in the call's
full row space and hands the policies a compact copy for the rows being computed, re-gathering only when the set
of rows changes (a few times per generation).
"""
from __future__ import annotations

import dataclasses

import torch

from ditfx.graph.meta import is_per_row

PARTS = 8  # row counts are multiples of ceil(captured rows / PARTS)


def bucket(k: int, rows: int) -> int:
    """The fewest rows, out of ``rows`` (the captured batch), a bucket holds that hold ``k`` rows: ``k`` rounded up
    to a multiple of ``ceil(rows / 8)``, at most ``rows`` (0 for 0)."""
    unit = -(-rows // PARTS)
    return min(rows, -(-k // unit) * unit)


def buckets(rows: int) -> list[int]:
    """Every row count :func:`bucket` gives for a captured batch of ``rows``, ascending (``rows`` last)."""
    return sorted({bucket(k, rows) for k in range(1, rows + 1)})


def gather(obj, ids: torch.Tensor, rows: int):
    """``obj`` with every per-row tensor (leading dimension ``rows``) restricted to ``ids``."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, ids) if is_per_row(obj, rows) else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: gather(getattr(obj, f.name), ids, rows)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: gather(v, ids, rows) for k, v in obj.items()}
    if isinstance(obj, list):
        return [gather(v, ids, rows) for v in obj]
    return obj


def scatter(full, compact, ids: torch.Tensor, rows: int):
    """``full`` updated with the per-row values of ``compact`` at ``ids``; other values are taken from compact."""
    n = len(ids)
    if isinstance(compact, torch.Tensor):
        if compact.dim() == 0 or compact.shape[0] != n:
            return compact
        if not (isinstance(full, torch.Tensor) and full.shape == (rows, *compact.shape[1:])):
            full = compact.new_zeros((rows, *compact.shape[1:]))  # rows never computed stay unused
        return full.index_copy(0, ids, compact)
    if dataclasses.is_dataclass(compact) and not isinstance(compact, type):
        return dataclasses.replace(compact, **{
            f.name: scatter(getattr(full, f.name, None), getattr(compact, f.name), ids, rows)
            for f in dataclasses.fields(compact) if f.init})
    if isinstance(compact, dict):
        old = full if isinstance(full, dict) else {}
        return {k: scatter(old.get(k), v, ids, rows) for k, v in compact.items()}
    if isinstance(compact, list):
        old = full if isinstance(full, list) and len(full) == len(compact) else [None] * len(compact)
        return [scatter(o, v, ids, rows) for o, v in zip(old, compact)]
    return compact


class RowState:
    """A policy state over ``rows`` rows, viewed through the subset of rows each call computes."""

    def __init__(self, state, rows: int):
        self.rows = rows
        self.full = state
        self.ids: tuple[int, ...] | None = None  # rows of the compact view; None: all rows (compact is full)
        self.compact = state

    def view(self, ids: torch.Tensor | None):
        key = None if ids is None or len(ids) == self.rows else tuple(ids.tolist())
        if key == self.ids:
            return self.compact
        if self.ids is not None:  # long even when empty: a call may compute none of a branch's rows
            self.full = scatter(self.full, self.compact, torch.tensor(self.ids, dtype=torch.long), self.rows)
        if key is not None:
            self.compact = gather(self.full, torch.tensor(key, dtype=torch.long), self.rows)
        else:
            self.compact = self.full
        self.ids = key
        return self.compact
