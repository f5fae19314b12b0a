"""Decisions under diffusers' context parallelism: every rank decides from sums over the context-parallel group.

With ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` each rank's blocks see 1/P of the
tokens and every block holds collectives (Ulysses' all-to-all, ring attention's all-gather): a block that one rank
skips and another runs leaves the other waiting in its collective forever. A policy whose decision reads a sum over
tokens (a change ratio's numerator and denominator, a calibration's change) asks the call for the group's sum
(``CallContext.group_sum``): one all-reduce of every statistic of the decision, packed in one float64 vector, so
each rank decides what one process decides on the whole sequence, up to summation order.

The group is the model's context-parallel mesh (diffusers' ``_parallel_config``), read at every call: parallelism
enabled after ``ditfx.optimize`` is seen at the next call.
"""
from __future__ import annotations

import datetime

import torch

TIMEOUT = datetime.timedelta(minutes=5)  # a collective that does not return by then names the decision it served


class ContextParallelGroup:
    """The ranks that hold one sequence's shards, and the sums their decisions read."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def sum(self, what: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed over the group, in one all-reduce (float64, on the group's device type)."""
        import torch.distributed as dist

        device = torch.device("cpu") if dist.get_backend(self.group) == "gloo" else tensors[0].device
        flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True).wait(TIMEOUT)
        except RuntimeError as e:
            raise RuntimeError(f"ditfx: the context-parallel ranks did not all reach the sum for {what} within "
                               f"{TIMEOUT} ({e}); every rank must run the same calls of the model in the same "
                               "order (the same inputs, steps and pipeline settings)") from None
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
            start += t.numel()
        return out


def trace_through_split_warnings() -> None:
    """Let Dynamo trace past the warning diffusers' context-parallel split hook logs for an input it does not split
    (Wan's 1-D timestep: "split will not be applied"), which would otherwise break the graph at every call."""
    try:
        from diffusers.hooks import context_parallel
    except ImportError:
        return
    torch._dynamo.config.ignore_logging_functions.add(context_parallel.logger.warning_once)


def context_parallel_group(module) -> ContextParallelGroup | None:
    """The model's context-parallel group where diffusers' parallelism splits its sequence over several ranks."""
    config = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None or mesh.size() <= 1:
        return None
    return ContextParallelGroup(mesh.get_group(), mesh.size())
