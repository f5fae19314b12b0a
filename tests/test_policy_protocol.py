"""Adding a technique is one folder and one line, as docs/architecture.md's worked example shows: a config, a pass
(its graph variants), a policy and a record, registered by one field of Config. Nothing else changes: not the
pass manager, the executor, the config codec, torch.compile's options or the model checks."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import ditfx
from conftest import run_loop, tiny_model
from ditfx.cache.policy import CachedValues, reuse_outputs, split_cached
from ditfx.cache.variants import residual_variant
from ditfx.graph.capture import capture
from ditfx.passes.manager import build_plan
from ditfx.plan import Transform
from ditfx.report import PassReport
from ditfx.runtime.compiler import RegionCompiler
from ditfx.runtime.executor import Executor
from ditfx.runtime.policy import Policy, StateSlot, register_policy
from ditfx.runtime.state import ModelRuntime
from ditfx.technique import Technique, technique_field
from ditfx.validation import check_int

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# ----------------------------------------------------------------- the folder: ditfx/skip_last/ in the docs
@dataclass(frozen=True)
class SkipLastBlock:  # config.py: the knob, validated at construction
    after: int = 2  # steps that run the last block

    def __post_init__(self):
        check_int("SkipLastBlock", "after", self.after, 1)


RESIDUAL = "skip_last.residual"  # variants.py: the variant its policy runs, declared once


@dataclass
class SkipLastReport(PassReport):
    pass_name: ClassVar[str] = "skip_last"
    block: str

    def summary(self) -> str:
        return f"skip_last: {self.block} offers {RESIDUAL}"


def offer(plan, config: SkipLastBlock, ctx) -> SkipLastReport:
    """The pass: the last block also returns its residual."""
    last = [rm for rm in plan.regions if rm.region.kind == "block"][-1]
    plan.transforms[RESIDUAL] = Transform(RESIDUAL, lambda rm, gm: residual_variant(gm, rm.region.streams,
                                                                                    "residual"))
    plan.offers.setdefault(last.region.name, set()).add(RESIDUAL)
    return SkipLastReport(last.region.name)


@register_policy(SkipLastBlock)
class SkipLastBlockPolicy(Policy):  # policy.py
    name = "skip_last"
    slots = (StateSlot("residual", lambda ctx: {}, scope="branch"),)

    def describe(self, steps: int) -> dict:
        return {"kind": "skip_last", "reused_steps": max(0, steps - self.config.after)}

    def run_region(self, ctx, call, proceed):
        if RESIDUAL not in self.plan.offers.get(call.region.name, ()):
            return proceed(call)
        cached = ctx.state(self, "residual")
        if ctx.info.step >= self.config.after and "r" in cached:  # x + the cached residual, not the block
            return call.reuse(reuse_outputs(call.rm, call.args, cached["r"], 0.0, "residual"))
        outs, residual = split_cached(call.rm, call.run((RESIDUAL,)))
        cached["r"] = CachedValues.first(residual, 0.0, forecast="none")
        return outs


SKIP_LAST = Technique(name="skip_last", configs=(SkipLastBlock,), offer=offer, order=4,  # __init__.py: the record
                      example="SkipLastBlock(after=2)", options={"skip": SkipLastBlock})


# ------------------------------------------------------------------------------ the one line (in Config)
@dataclass(frozen=True)
class MyConfig(ditfx.Config):
    skip_last: SkipLastBlock | None = technique_field(SKIP_LAST)


# ------------------------------------------------------------------------------------------------ tests
def test_a_new_technique_is_one_folder_and_one_line(tmp_path):
    model, kw = tiny_model("reference")
    config = MyConfig(skip_last=SkipLastBlock(after=2), compiler="eager")
    fast = ditfx.optimize(model, config)
    run_loop(fast, kw, "reference", steps=4)
    s = ditfx.stats(fast)
    assert (s.calls, s.generations, s.graph_breaks) == (4, 1, 0)
    assert s.block_evals_skipped == 2  # the last block at steps 2 and 3
    # the exact limit: never past `after`, the eager model's result
    exact = ditfx.optimize(tiny_model("reference")[0], MyConfig(skip_last=SkipLastBlock(after=8), compiler="eager"))
    assert (run_loop(exact, kw, "reference", steps=4) - run_loop(model, kw, "reference", steps=4)).abs().max() <= 1e-5
    # the config codec, torch.compile's dict options and the other techniques: unchanged, and they compose
    assert MyConfig.load(config.save(tmp_path / "c.json")) == config
    assert MyConfig.from_options({"skip_last": {"after": 3}}).skip_last == SkipLastBlock(3)
    both = MyConfig(cache=ditfx.DynamicCache(threshold=0.0, last=1), skip_last=SkipLastBlock(2), compiler="eager")
    assert [t.name for t, _ in both.techniques()] == ["cache", "skip_last"]  # the chain's order
    with pytest.raises(TypeError, match="MyConfig.skip_last must be SkipLastBlock or None"):
        MyConfig(skip_last=ditfx.DynamicCache())


def test_a_new_policy_plugs_into_the_executor_unchanged():
    model, kw = tiny_model("reference")
    gm, inputs = capture(model, fullgraph=True, **kw)
    plan = build_plan(gm, MyConfig(cache=ditfx.DynamicCache(threshold=0.0, last=1), skip_last=SkipLastBlock(2)))
    # last=1: the cache hands the last block on (proceed), so the new policy, after it in the chain, acts on it
    assert [type(c).__name__ for c in plan.policies] == ["DynamicCache", "SkipLastBlock"]
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


def test_every_policy_describes_itself_and_declares_what_it_needs():
    from ditfx.runtime.policy import _POLICIES

    for policy in _POLICIES.values():
        assert "describe" not in getattr(policy, "__abstractmethods__", ()), policy
        assert all(isinstance(why, str) and why for why in policy.requires.values()), policy


def test_a_missing_requirement_turns_the_technique_off_at_planning():
    """A graph without a timestep input: StaticCache and GuidanceWindow need one, so they are off with a warning
    that says why (not a call-time error); Adaptive Guidance needs none and stays on."""

    class FixedTimestep(torch.nn.Module):  # the timestep a constant of the graph, not an input
        def __init__(self):
            super().__init__()
            self.dit = tiny_model("reference")[0]

        def forward(self, x, y):
            return self.dit(x, torch.full((x.shape[0],), 500.0), y)

    model = FixedTimestep()
    x, y = torch.randn(2, 4, 8, 8), torch.arange(2)
    schedule = ditfx.CacheSchedule(blocks=[f"dit.blocks.{i}" for i in range(4)], times=[1.0, 0.5],
                                   change=[[0.0, 0.1]] * 4)
    for config, off in ((ditfx.Config(cache=ditfx.StaticCache(0.1, schedule=schedule), compiler="eager"), "cache"),
                        (ditfx.Config(guidance=ditfx.GuidanceWindow(0, 0.5), compiler="eager"), "guidance")):
        gm, inputs = capture(model, x, y, fullgraph=True)
        with pytest.warns(UserWarning, match=f"{off} off for this graph: .* needs the denoiser's timestep input"):
            plan = build_plan(gm, config, example_inputs=inputs)
        assert plan.policies == [] and off in plan.unavailable
    gm, inputs = capture(model, x, y, fullgraph=True)
    assert build_plan(gm, ditfx.Config(guidance=ditfx.AdaptiveGuidance())).policies == [ditfx.AdaptiveGuidance()]
