"""History attention's policy (ARD): each lower block's keys and values, written at the call's step.

State: per branch and per sample (``per_row``), one static buffer per attention site of the lower blocks,
``(steps - 1) x keys`` positions (the last step's keys are never read), and which positions hold a written step.
A call at step s runs each lower block's ``history.kv@s`` variant on the buffers' first ``s x keys`` positions
(views: each step attends to the keys that exist, one graph per step), then writes its own keys and values at
step s's positions; upper blocks run as they are. The buffers belong to the generation and are freed when it
ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ditfx.history.config import HistoryAttention
from ditfx.history.variants import HEADS, history_at
from ditfx.plan import Plan
from ditfx.runtime.policy import CallContext, Policy, RegionCall, StateSlot, register_policy


@dataclass
class _History:
    buffers: dict = field(default_factory=dict)  # block index -> [k, v, valid] per attention site


def _new_history(ctx: CallContext) -> _History:
    return _History()


@register_policy(HistoryAttention)
class HistoryPolicy(Policy):
    name = "history"
    slots = (StateSlot("history", _new_history, scope="branch", per_row=True),)

    def __init__(self, config: HistoryAttention, plan: Plan):
        super().__init__(config, plan)
        self.lower = set(plan.blocks_offering(history_at(0)))
        self._inputs: dict[int, list[torch.Tensor]] = {}  # block -> its history inputs' values at one step

    def describe(self, steps: int) -> dict:
        cfg, blocks = self.config, self.plan.block_names
        lower = [blocks[i] for i in sorted(self.lower)]
        return {"kind": "history", "layers": cfg.layers, "steps": cfg.steps, "blocks": lower,
                "heads": cfg.heads is not None,
                "description": (f"the lower {len(lower)} block(s) attend to the keys and values of up to {cfg.steps} "
                                "earlier steps of the generation" + ("; each step has its own output head"
                                                                     if cfg.heads is not None else ""))}

    def begin_call(self, ctx: CallContext) -> None:
        if self.lower and ctx.group is not None:
            raise RuntimeError("HistoryAttention does not run under context parallelism yet (the history keys "
                               "would be each rank's shard, not the sequence's): run the student on one process")
        if self.lower and not ctx.info.stated:
            # inferred boundaries miss a generation that starts below the previous one's last timestep (img2img),
            # which would then read the previous generation's keys
            raise RuntimeError("HistoryAttention reads the keys of the generation's earlier steps, so where a "
                               "generation starts must be stated, not inferred from the timestep: run the model in "
                               "a diffusers pipeline, or wrap each generation of a hand-written loop in "
                               "`with ditfx.generation(model):`")
        if self.lower and ctx.info.step >= self.config.steps:
            raise RuntimeError(f"HistoryAttention(steps={self.config.steps}) holds {self.config.steps} steps of "
                               "history "
                               f"and this generation is at step {ctx.info.step + 1}: raise steps, or mark "
                               "generations (a diffusers pipeline, or `with ditfx.generation(model):`)")

    def run_region(self, ctx: CallContext, call: RegionCall, proceed) -> list:
        region = call.region
        step = ctx.info.step
        if self.config.heads is not None and HEADS in self.plan.offers.get(region.name, ()):
            w, b = self.config.heads["weight"][step], self.config.heads["bias"][step]
            ref = call.args[0]
            return list(call.run((HEADS,), [*call.args, w.to(ref.device), b.to(ref.device)]))
        if region.kind != "block" or region.block.index not in self.lower:
            return proceed(call)
        state = ctx.state(self, "history")
        index = region.block.index
        buffers = state.buffers.get(index)
        if buffers is None:  # allocated once per generation, at the rows this call computes, for every step
            buffers = state.buffers[index] = self._allocate(call)
        # step s reads the prefix holding the s earlier steps (views of the static buffer, no copy)
        reads = [buf[:, :, :step * _keys(one)] if buf.dim() == 4 else buf[:, :step * _keys(one)]
                 for buf, one in zip(buffers, self._one_step(call))]
        outs = call.run((history_at(step),), [*call.args, *reads])
        n = len(region.outputs)
        own = outs[n:]
        for j in range(len(own) // 2):
            k, v = own[2 * j], own[2 * j + 1]
            length = k.shape[2]
            # the work of reading the earlier steps' keys: Q K^T and A V over step * length more keys
            call.extra_flops += 4 * k.shape[0] * k.shape[1] * length * step * length * k.shape[3]
            if step + 1 < self.config.steps:  # a later step reads it
                hk, hv, valid = buffers[3 * j: 3 * j + 3]
                hk[:, :, step * length:(step + 1) * length] = k
                hv[:, :, step * length:(step + 1) * length] = v
                valid[:, step * length:(step + 1) * length] = True
        return list(outs[:n])

    def _one_step(self, call: RegionCall) -> list[torch.Tensor]:
        """The values of a block's history inputs at one step of history: keys and values (B, H, keys, d) and
        written flags (B, keys) per attention site (the second step's variant; with steps=1, the first's, empty)."""
        index = call.region.block.index
        if index not in self._inputs:
            key = self.plan.key(call.rm, (history_at(min(1, self.config.steps - 1)),))
            self._inputs[index] = self.plan.input_values(call.rm, key)[len(call.args):]
        return self._inputs[index]

    def _allocate(self, call: RegionCall) -> list[torch.Tensor]:
        """Buffers of ``steps - 1`` steps (the last step's keys are never read) per input, zeroed."""
        out = []
        for one in self._one_step(call):
            shape = list(one.shape[1:])
            shape[1 if one.dim() == 4 else 0] = _keys(one) * (self.config.steps - 1)
            out.append(torch.zeros((call.rows, *shape), dtype=one.dtype, device=call.args[0].device))
        return out


def _keys(one_step: torch.Tensor) -> int:
    """Positions one step of history takes in an input: dim 2 of keys and values, dim 1 of the flags."""
    return one_step.shape[2] if one_step.dim() == 4 else one_step.shape[1]
