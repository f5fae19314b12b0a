"""The executor: runs a Plan's compiled regions in order, asking the cache policy about each block."""
from __future__ import annotations

import torch
import torch.fx as fx

from ditfx.config import Config
from ditfx.graph.regions import RegionModule
from ditfx.passes.manager import Plan
from ditfx.runtime.block_cache import make_policy
from ditfx.runtime.compiler import RegionCompiler
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
        cacheable = {rm.region.block.index for rm in plan.regions if rm.region.name in plan.variants}
        self.policy = (make_policy(config.cache, len(plan.structure.blocks), cacheable)
                       if config.cache is not None else None)

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

    def _run(self, rm: RegionModule, variant: str, args: list) -> tuple:
        gm = rm.gm if variant == "base" else self.plan.variants[rm.region.name][variant]
        return self.compiler.run((rm.signature, variant), gm, args,
                                 compile=rm.region.kind == "block" or self.compile_edges)

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
        state = None
        if self.policy is not None:
            key = (id(self), step.branch)
            state = session.state.get(key)
            if state is None:
                state = session.state[key] = self.policy.new_state()
            self.policy.begin_call(state, step)

        env = dict(zip(self.input_names, args))
        for k, rm in enumerate(self.plan.regions):
            region = rm.region
            region_args = [env[name] for name in self.region_inputs[k]]
            flops = self.plan.flops[region.name]
            if region.kind == "block" and self.policy is not None:
                outs, ran = self.policy.run_block(
                    state, step, region.block.index, rm, region_args,
                    lambda variant, a, rm=rm: self._run(rm, variant, a),
                )
            else:
                outs, ran = self._run(rm, "base", region_args), True
            if region.kind == "block":
                stats.block_evals += ran
                stats.block_evals_skipped += not ran
            if ran:
                stats.flops += flops
            else:
                stats.flops_skipped += flops
            env.update(zip(self.region_outputs[k], outs))
            for name in self.release[k]:
                del env[name]
        return fx.node.map_arg(self.output, lambda n: env[n.name])
