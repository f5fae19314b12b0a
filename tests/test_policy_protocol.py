"""The policy protocol, used as docs/architecture.md's worked example does: a new technique is a config and a
registered policy; the executor does not change."""
from dataclasses import dataclass

import torch

import ditfx
from conftest import tiny_model
from ditfx.passes.manager import build_plan
from ditfx.runtime.block_cache import CachedValues, reuse_outputs, split_cached
from ditfx.runtime.compiler import RegionCompiler
from ditfx.runtime.executor import Executor
from ditfx.runtime.policy import Policy, StateSlot, register_policy
from ditfx.runtime.state import ModelRuntime


@dataclass(frozen=True)
class SkipLastBlock:
    after: int = 2  # steps that run the last block


@register_policy(SkipLastBlock)
class SkipLastBlockPolicy(Policy):
    name = "skip_last"
    slots = (StateSlot("residual", lambda ctx: {}, scope="branch"),)

    def run_region(self, ctx, call, proceed):
        last = len(self.plan.structure.blocks) - 1
        if call.region.kind != "block" or call.region.block.index != last:
            return proceed(call)
        cached = ctx.state(self, "residual")
        if ctx.info.step >= self.config.after and "r" in cached:
            return call.reuse(reuse_outputs(call.rm, call.args, cached["r"], 0.0, "residual"))
        outs, residual = split_cached(call.rm, call.run(("cache.residual",)))
        cached["r"] = CachedValues.first(residual, 0.0, forecast="none")
        return outs


def captured(model, kw):
    got = []

    def capture(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(**kw)
    torch._dynamo.reset()
    return got[0]


def test_a_new_policy_plugs_into_the_executor_unchanged():
    model, kw = tiny_model("reference")
    gm, inputs = captured(model, kw)
    plan = build_plan(gm, ditfx.Config(cache=ditfx.DynamicCache(threshold=0.0, last=1)))  # offers cache.residual;
    # last=1: the cache hands the last block on (proceed), so the new policy, after it in the chain, acts on it
    plan.policies.append(SkipLastBlock(after=2))
    runtime = ModelRuntime()
    runtime.compiler = RegionCompiler("eager")
    executor = Executor(plan, runtime, inputs, compile_edges=False)
    x_pos, t_pos = executor.latents_pos, executor.timestep_pos
    args = list(inputs)
    with torch.no_grad():
        for k in range(4):
            args[t_pos] = torch.full_like(inputs[t_pos], 1000.0 * (1 - k / 4))
            out = executor(*args)
            args[x_pos] = args[x_pos] - out[0][:, :4] / 4
    s = runtime.snapshot()
    assert (s.calls, s.generations) == (4, 1)
    assert s.block_evals_skipped == 2  # the last block at steps 2 and 3; the dynamic cache at 0 skips nothing
