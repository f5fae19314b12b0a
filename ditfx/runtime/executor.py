"""The executor: runs a Plan's compiled regions in order, asking the cache policy about each block."""
from __future__ import annotations

import torch
import torch.fx as fx

import warnings

from ditfx.config import Config
from ditfx.graph import meta
from ditfx.graph.regions import RegionModule
from ditfx.passes.guidance import COSINE_VARIANT, cosine_sums_variant
from ditfx.passes.manager import Plan
from ditfx.passes.rebatch import RebatchError, rebatch
from ditfx.runtime.block_cache import make_policy
from ditfx.runtime.compiler import RegionCompiler
from ditfx.runtime.guidance import CallPlan, GuidancePolicy
from ditfx.runtime.rows import RowState
from ditfx.runtime.session import Session


class Executor:
    """Called by Dynamo in place of the captured graph, with the same inputs and outputs.

    Data-dependent decisions (reuse a cached residual or run the block) are made here, between compiled
    regions, so no region has a graph break and Dynamo's guards never see a decision.
    """

    def __init__(self, plan: Plan, config: Config, session: Session, example_inputs: list):
        self.plan = plan
        self.session = session
        self.compiler = RegionCompiler(config.compiler)
        self.compile_edges = config.compile_regions == "all"
        gm = plan.structure.gm
        roles = plan.structure.roles
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.input_names = [p.name for p in placeholders]
        self.weights = [x for p, x in zip(placeholders, example_inputs) if p.name in roles.weights]
        self.timestep_pos = self.input_names.index(roles.timestep) if roles.timestep else None
        self.output = gm.graph.find_nodes(op="output")[0].args[0]
        self.region_inputs = [[n.name for n in rm.region.inputs] for rm in plan.regions]
        self.region_outputs = [[n.name for n in rm.region.outputs] for rm in plan.regions]
        self.release = self._release_lists()
        cacheable = set(plan.cacheable_blocks)
        self.policy = (make_policy(config.cache, len(plan.structure.blocks), cacheable)
                       if config.cache is not None else None)
        self.guidance = GuidancePolicy(config.guidance) if config.guidance is not None else None
        self.latents_pos = self.input_names.index(roles.latents) if roles.latents else None
        self.output_names = []
        fx.node.map_arg(self.output, lambda n: self.output_names.append(n.name))
        self.output_meta = [meta.tensor_value(n) for n in _flat_nodes(self.output)]
        self.cosine_output = self._cosine_output()
        self.rows = self._call_rows(example_inputs, roles)
        self.batch_flags = self._batch_flags(gm, roles)
        self._graphs: dict[tuple[str, str, int], fx.GraphModule] = {}  # re-batched and measuring variants
        self._not_rebatchable: set[tuple] = set()  # (rows,) for guidance, (signature, variant, rows) for the cache

    def _cosine_output(self) -> int | None:
        """Which epilogue output is the prediction, when Adaptive Guidance can measure it in the epilogue."""
        if self.guidance is None or not self.guidance.measures_cosine:
            return None
        last = self.plan.regions[-1]
        outputs = self.region_outputs[-1]
        if last.region.kind != "epilogue" or self.output_names[0] not in outputs:
            return None  # the runtime measures after the call instead
        return outputs.index(self.output_names[0])

    def _call_rows(self, example_inputs: list, roles) -> int | None:
        if self.latents_pos is None:
            return None
        x = example_inputs[self.latents_pos]
        return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    def _batch_flags(self, gm: fx.GraphModule, roles) -> dict[str, list[bool]]:
        """Per region, which inputs carry the call's rows: batch-sized tensors computed from the batch-sized
        non-weight inputs (through any op, tuples included)."""
        rows = self.rows

        def sized(n: fx.Node) -> bool:
            v = meta.tensor_value(n)
            return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows

        derived: set[str] = set()
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if sized(n) and n.name not in roles.weights:
                    derived.add(n.name)
            elif any(a.name in derived for a in n.all_input_nodes):
                derived.add(n.name)
        carrying = {n.name for n in gm.graph.nodes if n.name in derived and sized(n)}
        self.input_flags = [name in carrying for name in self.input_names]
        return {rm.region.name: [i.name in carrying for i in rm.region.inputs] for rm in self.plan.regions}

    def _release_lists(self) -> list[list[str]]:
        """Values no later region reads are dropped after their last reader, so memory stays flat."""
        kept: set[str] = set()
        fx.node.map_arg(self.output, lambda n: kept.add(n.name))
        last: dict[str, int] = {}
        for k, names in enumerate(self.region_inputs):
            for name in names:
                last[name] = k
        placeholders = set(self.input_names)
        release = [[] for _ in self.region_inputs]
        for name, k in last.items():
            if name not in kept and name not in placeholders:
                release[k].append(name)
        return release

    def _graph(self, rm: RegionModule, variant: str, rows: int) -> fx.GraphModule:
        if rows == self.rows:
            return rm.gm if variant == "base" else self.plan.variants[rm.region.name][variant]
        key = (rm.signature, variant, rows)
        if key not in self._graphs:
            gm = self._graph(rm, variant, self.rows)
            flags = self.batch_flags[rm.region.name]
            extra = len(list(gm.graph.find_nodes(op="placeholder"))) - len(flags)
            self._graphs[key] = rebatch(gm, self.rows, rows, flags + [True] * extra)  # probe's cache_ref
        return self._graphs[key]

    def _run(self, rm: RegionModule, variant: str, args: list, rows: int) -> tuple:
        return self.compiler.run((rm.signature, variant, rows), lambda: self._graph(rm, variant, rows), args,
                                 compile=rm.region.kind == "block" or self.compile_edges)

    def _run_measuring(self, rm: RegionModule, args: list, rows: int, pairs) -> tuple[tuple, tuple]:
        """The epilogue with Adaptive Guidance's sums for the (uncond, cond) row ``pairs``, always compiled: the
        sums are reductions over the prediction the compiled region writes anyway."""
        key = (rm.signature, COSINE_VARIANT, rows)
        if key not in self._graphs:
            self._graphs[key] = cosine_sums_variant(self._graph(rm, "base", rows), self.cosine_output)
        res = self.compiler.run(key, lambda: self._graphs[key], [*args, *pairs], compile=True)
        return tuple(res[:-3]), tuple(res[-3:])

    def _run_on_rows(self, rm: RegionModule, variant: str, args: list, n: int,
                     ids: torch.Tensor) -> tuple[tuple, int] | None:
        """``variant`` on rows ``ids`` of the ``n`` in ``args`` (their outputs, in that order) and the number of rows
        it ran on, or None when no smaller re-batched graph serves.

        The rows are padded with others up to a bucket (n/8, n/4 or n/2, rounded up) so that changing subsets
        compile at most three re-batched graphs per variant; the padding rows' outputs are discarded.
        """
        size = row_bucket(len(ids), n)
        if size is None or not self._rebatches(
                (rm.signature, variant, size), [(rm, variant)], size,
                f"ditfx cache: cannot run {rm.region.name} on {size} of its {self.rows} rows ({{error}}); mixed "
                "batches compute every row there (no saving, same result)"):
            return None
        picked = torch.zeros(n, dtype=torch.bool, device=ids.device)
        picked[ids] = True
        padded = torch.cat([ids, (~picked).nonzero().flatten()[:size - len(ids)]])
        flags = self.batch_flags[rm.region.name]
        sub = [a.index_select(0, padded.to(a.device)) if flag else a for a, flag in zip(args, flags)]
        outs = self._run(rm, variant, sub, size)
        return tuple(o[:len(ids)] if isinstance(o, torch.Tensor) and o.dim() > 0 else o for o in outs), size

    def _supports_rows(self, rows: int) -> bool:
        """Whether every region (and cache variant) can run on ``rows`` rows; warns once when not."""
        if rows == self.rows:
            return True
        graphs = [(rm, variant) for rm in self.plan.regions
                  for variant in ["base", *self.plan.variants.get(rm.region.name, {})]]
        return self._rebatches((rows,), graphs, rows,
                               f"ditfx guidance: cannot run this graph on {rows} of its {self.rows} rows ({{error}}); "
                               "those calls compute every row (no saving, same result)")

    def _rebatches(self, key: tuple, graphs: list[tuple[RegionModule, str]], rows: int, warning: str) -> bool:
        """Whether each ``(region, variant)`` re-batches to ``rows`` rows. A refusal is remembered under ``key`` and
        warned once (``warning`` with ``{error}`` filled in)."""
        if key in self._not_rebatchable:
            return False
        try:
            for rm, variant in graphs:
                self._graph(rm, variant, rows)
        except RebatchError as e:
            self._not_rebatchable.add(key)
            warnings.warn(warning.format(error=e), stacklevel=4)
            return False
        return True

    def _timestep(self, args) -> float | None:
        if self.timestep_pos is None:
            return None
        t = args[self.timestep_pos]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def __call__(self, *args):
        session, stats = self.session, self.session.stats
        step = session.tracker.observe(self._timestep(args))
        if step.new_generation:
            session.state.clear()
            stats.generations += 1
        if step.branch == 0:
            stats.steps += 1
        stats.calls += 1
        if self.guidance is None:
            outs, _ = self._run_rows(args, step, None)
            stats.nfe += 1
            return self._outputs(outs)
        gstate = session.state.get(("guidance", id(self)))
        if gstate is None:
            gstate = session.state[("guidance", id(self))] = self.guidance.new_state()
        plan = self.guidance.begin_call(gstate, step, args[self.latents_pos])
        rows = plan.rows
        if rows is not None and len(rows) and not self._supports_rows(len(rows)):
            rows = None  # compute everything; completing the call still applies the plan's fills
        computed = self.rows if rows is None else len(rows)
        call_plan = CallPlan(rows, plan.kind, plan.copy_from_cond, plan.estimate)
        cosine = None
        if plan.kind == "none":
            outs, computed = [], 0
        else:
            pairs = self.guidance.measured_pairs(gstate, call_plan) if self.cosine_output is not None else None
            device = args[self.latents_pos].device
            outs, sums = self._run_rows(args, step, rows,
                                        [p.to(device) for p in pairs[:2]] if pairs is not None else None)
            if sums is not None:
                cosine = self.guidance.cosine_of(gstate, pairs[2], sums)
        full = self.guidance.complete(gstate, step, call_plan, outs,
                                      self._empty_outputs() if plan.kind == "none" else outs, cosine)
        branch_rows = gstate.half if gstate.layout in ("batched", "two_call") else self.rows
        stats.nfe += computed / branch_rows
        stats.nfe_skipped += (self.rows - computed) / branch_rows
        return self._outputs(full)

    def _empty_outputs(self) -> list:
        return [torch.empty(v.shape, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v
                for v in self.output_meta]

    def _outputs(self, flat: list):
        values = dict(zip(self.output_names, flat))
        return fx.node.map_arg(self.output, lambda n: values[n.name])

    def _cache_state(self, step, rows: torch.Tensor | None):
        key = (id(self), step.branch)
        holder = self.session.state.get(key)
        if holder is None:
            holder = self.session.state[key] = RowState(self.policy.new_state(), self.rows)
        return holder.view(rows)

    def _run_rows(self, args: tuple, step, rows: torch.Tensor | None, pairs=None) -> tuple[list, tuple | None]:
        """Run every region on the call's ``rows`` (None: all rows); returns the graph's outputs, flat, and with
        ``pairs`` (uncond rows, cond rows of the computed output) Adaptive Guidance's sums from the epilogue."""
        stats = self.session.stats
        n = self.rows if rows is None else len(rows)
        if rows is not None:
            args = [a.index_select(0, rows) if flag else a for a, flag in zip(args, self.input_flags)]
        state = None
        if self.policy is not None:
            state = self._cache_state(step, rows)
            self.policy.begin_call(state, step)
        env = dict(zip(self.input_names, args))
        sums = None
        for k, rm in enumerate(self.plan.regions):
            region = rm.region
            region_args = [env[name] for name in self.region_inputs[k]]
            flops = self.plan.flops[region.name] * n // self.rows if self.rows else self.plan.flops[region.name]
            ran_rows = n
            if region.kind == "block" and self.policy is not None:
                runner = _BlockRunner(self, rm, n)
                outs, ran = self.policy.run_block(state, step, region.block.index, rm, region_args, runner)
                ran_rows = runner.ran_rows if ran else 0
            elif pairs is not None and k == len(self.plan.regions) - 1:
                (outs, sums), ran = self._run_measuring(rm, region_args, n, pairs), True
            else:
                outs, ran = self._run(rm, "base", region_args, n), True
            if region.kind == "block":
                stats.block_evals += ran
                stats.block_evals_skipped += not ran
            ran_flops = flops * ran_rows // n if n else 0
            stats.flops += ran_flops
            stats.flops_skipped += flops - ran_flops
            env.update(zip(self.region_outputs[k], outs))
            for name in self.release[k]:
                del env[name]
        return [env[name] for name in self.output_names], sums


def row_bucket(k: int, n: int) -> int | None:
    """The fewest rows out of ``n`` (a bucket: n/8, n/4 or n/2, rounded up) that hold ``k`` rows, or None when only
    all ``n`` do."""
    for parts in (8, 4, 2):
        size = -(-n // parts)
        if k <= size < n:
            return size
    return None


class _BlockRunner:
    """Runs a block region's variants for a cache policy; records on how many rows it last ran."""

    def __init__(self, executor: Executor, rm: RegionModule, n: int):
        self.executor, self.rm, self.n = executor, rm, n
        self.ran_rows = n

    def __call__(self, variant: str, args: list) -> tuple:
        self.ran_rows = self.n
        return self.executor._run(self.rm, variant, args, self.n)

    def on_rows(self, variant: str, args: list, ids: torch.Tensor) -> tuple | None:
        result = self.executor._run_on_rows(self.rm, variant, args, self.n, ids)
        if result is None:
            return None
        outs, self.ran_rows = result
        return outs


def _flat_nodes(output) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(output, nodes.append)
    return nodes
