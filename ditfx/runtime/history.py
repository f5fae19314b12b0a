"""The history-attention policy (ARD): each lower block's keys and values, written at the call's step.

State: per branch and per sample (``per_row``), one static buffer per attention site of the lower blocks,
``steps x keys`` positions, and which positions hold a written step. A call at step s runs the ``history.kv``
variant of each lower block with the buffers, then writes its own keys and values at step s's positions; upper
blocks run as they are. The buffers belong to the generation and are freed when it ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ditfx.config import HistoryAttention
from ditfx.graph import meta
from ditfx.plan import Plan
from ditfx.runtime.policy import CallContext, Policy, RegionCall, StateSlot, register_policy


HISTORY = "history.kv"  # the block variant that reads and returns keys and values (passes/history.py)
HEADS = "history.heads"  # the epilogue variant whose de-embedding takes the step's head


@dataclass
class _History:
    buffers: dict = field(default_factory=dict)  # block index -> [k, v, valid] per attention site


def _new_history(ctx: CallContext) -> _History:
    return _History()


@register_policy(HistoryAttention)
class HistoryPolicy(Policy):
    name = "history"
    slots = (StateSlot("history", _new_history, scope="branch", per_row=True),)

    def __init__(self, cfg: HistoryAttention, plan: Plan):
        super().__init__(cfg, plan)
        self.cfg = cfg
        self.lower = set(plan.blocks_offering(HISTORY))

    def begin_call(self, ctx: CallContext) -> None:
        if self.lower and ctx.info.step >= self.cfg.steps:
            raise RuntimeError(f"HistoryAttention(steps={self.cfg.steps}) holds {self.cfg.steps} steps of history "
                               f"and this generation is at step {ctx.info.step + 1}: raise steps, or mark "
                               "generations (a diffusers pipeline, or `with ditfx.generation(model):`)")

    def run_region(self, ctx: CallContext, call: RegionCall, proceed) -> list:
        region = call.region
        if self.cfg.heads is not None and HEADS in self.plan.offers.get(region.name, ()):
            step = ctx.info.step
            w, b = self.cfg.heads["weight"][step], self.cfg.heads["bias"][step]
            ref = call.args[0]
            return list(call.run((HEADS,), [*call.args, w.to(ref.device), b.to(ref.device)]))
        if region.kind != "block" or region.block.index not in self.lower:
            return proceed(call)
        state = ctx.state(self, "history")
        index = region.block.index
        gm = self.plan.graph(call.rm, self.plan.key(call.rm, (HISTORY,)))
        extra = list(gm.graph.find_nodes(op="placeholder"))[len(call.args):]
        buffers = state.buffers.get(index)
        if buffers is None:  # allocated once per generation, at the rows this call computes
            ref = call.args[0]
            buffers = state.buffers[index] = [
                torch.zeros((call.rows, *meta.tensor_value(p).shape[1:]), dtype=meta.tensor_value(p).dtype,
                            device=ref.device) for p in extra]
        outs = call.run((HISTORY,), [*call.args, *buffers])
        n = len(region.outputs)
        own = outs[n:]
        step = ctx.info.step
        for j in range(len(own) // 2):
            k, v = own[2 * j], own[2 * j + 1]
            length = k.shape[2]
            # the work of reading the earlier steps' keys: Q K^T and A V over step * length more keys (the
            # symbolic count, methods.md 4.4; the static buffer's masked positions are not useful work)
            call.extra_flops += 4 * k.shape[0] * k.shape[1] * length * step * length * k.shape[3]
            hk, hv, valid = buffers[3 * j: 3 * j + 3]
            hk[:, :, step * length:(step + 1) * length] = k
            hv[:, :, step * length:(step + 1) * length] = v
            valid[:, step * length:(step + 1) * length] = True
        return list(outs[:n])
