"""The executor: a generic interpreter of a Plan's regions, with the policies' hooks around the call and each
region. It names no technique: what a technique does lives in its policy (``ditfx.runtime.policy``)."""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ditfx.graph.regions import RegionModule
from ditfx.plan import ModeKey, Plan, VariantUnavailable
from ditfx.runtime.policy import CallContext, ModeSelector, Policy, RegionCall, policy_for
from ditfx.runtime.rows import bucket
from ditfx.runtime.state import ModelRuntime
from ditfx.runtime.warn import WarnOnce


class Executor:
    """Called by Dynamo in place of the captured graph, with the same inputs and outputs.

    Data-dependent decisions (reuse what a region returned before, drop rows, run another mode) are made by the policies
    between compiled regions, so no region has a graph break and Dynamo's guards never see a decision.
    """

    def __init__(self, plan: Plan, runtime: ModelRuntime, example_inputs: list, compile_edges: bool):
        self.plan = plan
        self.io = plan.io
        self.runtime = runtime
        self.compile_edges = compile_edges
        self.modes: dict[ModeKey | None, Mode] = {None: Mode(None, plan, self)}
        for key, sub in plan.modes.items():
            self.modes[key] = Mode(key, sub, self, plan.mode_inputs[key])
        self.selectors = self.modes[None].selectors
        roles = self.io.input_roles
        # weak: Dynamo keeps the executor alive, and the executor must not keep a deleted model's weights
        self._weights = [weakref.ref(x) for name, x in zip(self.io.input_names, example_inputs)
                         if roles.get(name) == "weight" and isinstance(x, torch.Tensor)]
        self.timestep_pos = self.io.position("timestep")
        self.latents_pos = self.io.position("latents")
        self.warn_once = WarnOnce()

    def weight_ids(self) -> set[int]:
        return {id(t) for ref in self._weights if (t := ref()) is not None}

    # ------------------------------------------------------------------------------------- one call
    def __call__(self, *args):
        runtime = self.runtime
        latents = args[self.latents_pos] if self.latents_pos is not None else None
        info = runtime.lifecycle.observe(self._timestep(args), latents)
        store = runtime.store()
        if info.new_generation or store.generation != info.generation:
            store.start(info.generation)
        ctx = CallContext(info, list(args), self.plan, store, runtime.records, runtime.parallel_group())
        mode = self.modes[None]
        key = self._choose_mode(ctx)
        if key is not None:
            mode = self.modes[key]
            ctx.enter_mode(key, mode.plan, mode.inputs)
        for policy in mode.policies:
            policy.begin_call(ctx)
        rows = ctx.rows
        if rows is not None and len(rows) and len(rows) != self.io.rows and not mode.supports_rows(len(rows)):
            ctx.rows = None  # compute every row; the policies' end_call still completes the call
        if ctx.rows is not None and not len(ctx.rows):
            flat, evals = self.io.empty_outputs(latents.device if latents is not None else None), {}
        else:
            flat, evals = mode.run_regions(ctx)
        for policy in reversed(mode.policies):
            flat = policy.end_call(ctx, flat)
        for selector in self.selectors:
            flat = selector.end_call(ctx, flat)
        runtime.add(generations=int(info.new_generation), steps=int(info.index == 0), calls=1, nfe=ctx.nfe,
                    nfe_skipped=ctx.nfe_skipped, **evals)
        runtime.add_mode(mode.name, calls=1, flops=evals.get("flops", 0), **ctx.mode_counts)
        return self.io.outputs(flat)

    def _choose_mode(self, ctx: CallContext) -> ModeKey | None:
        for selector in self.selectors:
            key = selector.choose_mode(ctx)
            if key is not None:
                if key not in self.modes:
                    raise RuntimeError(f"{type(selector).__name__} chose the mode {key}, which this plan does not "
                                       f"have (its modes: {[str(k) for k in self.modes if k is not None]})")
                return key
        return None

    def _timestep(self, args) -> float | None:
        if self.timestep_pos is None:
            return None
        t = args[self.timestep_pos]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)



class Mode:
    """One mode of the model: its plan (the captured graph, or another graph of the model a technique built), the
    policies running on it, the inputs its graphs take beyond the call's, and how its regions run."""

    def __init__(self, key: ModeKey | None, plan: Plan, executor: Executor, inputs: list | None = None):
        self.key = key
        self.name = "native" if key is None else key.name  # in stats
        self.plan = plan
        self.io = plan.io
        self.executor = executor
        policies: list[Policy] = [policy_for(c, plan) for c in plan.policies]
        self.selectors = [p for p in policies if isinstance(p, ModeSelector)]
        self.policies = [p for p in policies if not isinstance(p, ModeSelector)]  # the chain
        self.inputs = list(inputs or [])
        self._refused: set[int] = set()  # row counts some region cannot run on

    def run_regions(self, ctx: CallContext) -> tuple[list, dict]:
        io, rows = self.io, ctx.rows
        n = io.rows if rows is None else len(rows)
        args = ctx.args
        if rows is not None:
            args = [a.index_select(0, rows.to(a.device)) if flag else a for a, flag in zip(args, io.input_batch)]
        env = dict(zip(io.input_names, args))
        evals = dict(block_evals=0, block_evals_skipped=0, flops=0, flops_skipped=0)
        chain = self._chain(ctx, 0)
        for k, rm in enumerate(self.plan.regions):
            call = RegionCall(rm, [env[name] for name in io.region_inputs[k]], n, self)
            outs = chain(call)
            flops = self.plan.flops[rm.region.name] * n // io.rows if io.rows else self.plan.flops[rm.region.name]
            ran = call.ran_rows if call.ran_rows >= 0 else n
            if rm.region.kind == "block":
                evals["block_evals"] += ran > 0
                evals["block_evals_skipped"] += ran == 0
            ran_flops = flops * ran // n if n else 0
            evals["flops"] += ran_flops + call.extra_flops
            evals["flops_skipped"] += flops - ran_flops
            env.update(zip(io.region_outputs[k], outs))
            for name in io.release[k]:
                del env[name]
        return [env[name] for name in io.output_names], evals

    def _chain(self, ctx: CallContext, i: int) -> Callable[[RegionCall], list]:
        if i == len(self.policies):
            return lambda call: list(call.run())
        policy, proceed = self.policies[i], self._chain(ctx, i + 1)
        return lambda call: policy.run_region(ctx, call, proceed)

    # ------------------------------------------------------------------------------ running variants
    def run(self, rm: RegionModule, transforms: tuple[str, ...], args: list, rows: int) -> tuple:
        key = self.plan.key(rm, transforms, rows)
        compile_it = (rm.region.kind == "block" or self.executor.compile_edges
                      or any(self.plan.transforms[t].compiled for t in transforms))
        return self.executor.runtime.compiler.run(key, lambda: self.plan.graph(rm, key), args, compile=compile_it)

    def run_on_rows(self, rm: RegionModule, transforms: tuple[str, ...], args: list, n: int,
                    ids: torch.Tensor) -> tuple[tuple, int] | None:
        """The variant on rows ``ids`` of the ``n`` in ``args`` (their outputs, in that order) and the number of
        rows it ran on, or None when no smaller graph serves.

        The rows are padded with others up to a bucket (:func:`~ditfx.runtime.rows.bucket`) so that changing
        subsets build few re-batched graphs per variant; the padding rows' outputs are discarded.
        """
        size = bucket(len(ids), self.io.rows or n)
        if size >= n or not self._builds(rm, transforms, size):
            return None
        picked = torch.zeros(n, dtype=torch.bool, device=ids.device)
        picked[ids] = True
        padded = torch.cat([ids, (~picked).nonzero().flatten()[:size - len(ids)]])
        flags = self.io.region_batch[self.plan.regions.index(rm)]
        sub = [a.index_select(0, padded.to(a.device)) if flag else a for a, flag in zip(args, flags)]
        outs = self.run(rm, transforms, sub, size)
        return tuple(o[:len(ids)] if isinstance(o, torch.Tensor) and o.dim() > 0 else o for o in outs), size

    def _builds(self, rm: RegionModule, transforms: tuple[str, ...], rows: int) -> bool:
        try:
            self.plan.graph(rm, self.plan.key(rm, transforms, rows))
            return True
        except VariantUnavailable as e:
            self.executor.warn_once(
                ("rows", rm.signature, transforms, rows),
                f"ditfx: cannot run {rm.region.name} on {rows} of its {self.io.rows} rows ({e}); those calls "
                "compute every row there (no saving, same result)", stacklevel=5)
            return False

    def supports_rows(self, rows: int) -> bool:
        """Whether every region, with every transform it offers, can run on ``rows`` rows; warns once when not."""
        if rows in self._refused:
            return False
        try:
            for rm in self.plan.regions:
                offered = [t for t in self.plan.offers.get(rm.region.name, ())
                           if not self.plan.transforms[t].after_rows]
                for transforms in [(), *((t,) for t in offered)]:
                    self.plan.graph(rm, self.plan.key(rm, transforms, rows))
        except VariantUnavailable as e:
            self._refused.add(rows)
            self.executor.warn_once(("graph rows", self.name, rows), f"ditfx: cannot run this graph on {rows} of its "
                                    f"{self.io.rows} rows ({e}); those calls compute every row (no saving, same "
                                    "result)", stacklevel=3)
            return False
        return True

