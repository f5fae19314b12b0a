"""Guidance skipping's graph variant (its pass): Adaptive Guidance's measurement fused into the compiled epilogue.

AG compares the conditional and unconditional predictions of each sample on every full-guidance step. Done by
the runtime after the call, that is one more read of the whole prediction; done here, the sums are taken where
the epilogue writes the prediction, in the same compiled region. The epilogue's graph gains two inputs (which
output rows hold each measured sample's unconditional and conditional prediction) and three outputs::

    %pred = ... (N, C, H, W)                          the epilogue's prediction output
    %u = index_select(%pred, 0, %uncond_rows).flatten(1).double()     (M, C*H*W)
    %c = index_select(%pred, 0, %cond_rows).flatten(1).double()       (M, C*H*W)
    return (..., sum(u * c, 1), sum(u * u, 1), sum(c * c, 1))        3 x (M,)

from which the runtime takes the cosine ``u.c / sqrt(|u|^2 |c|^2)`` (float64 sums, as ``cosine_similarity`` on
float64 inputs). The variant is built per row count, after re-batching: the pass registers it in the plan as
the ``guidance.cosine`` transform (:func:`guidance_pass`).
"""
from __future__ import annotations

import contextlib
import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.plan import Plan, Transform
from ditfx.report import PassReport
from ditfx.technique import PassContext

COSINE = "guidance.cosine"  # the epilogue variant the guidance policies run (declared here, once)


def cosine_sums_variant(gm: fx.GraphModule, pred_index: int) -> fx.GraphModule:
    """A copy of ``gm`` taking ``(*inputs, uncond_rows, cond_rows)`` and returning its outputs followed by the
    per-pair sums ``u.c``, ``u.u``, ``c.c`` of output ``pred_index``."""
    out = copy.deepcopy(gm)
    g = out.graph
    last_input = list(g.find_nodes(op="placeholder"))[-1]
    with g.inserting_after(last_input):
        uncond_rows = g.placeholder("cfg_uncond_rows")
    with g.inserting_after(uncond_rows):
        cond_rows = g.placeholder("cfg_cond_rows")
    output = g.find_nodes(op="output")[0]
    results = tuple(output.args[0])
    pred = results[pred_index]
    value = meta.tensor_value(pred)
    if value is not None:  # one (uncond, cond) pair of rows per sample, like the captured values (export reads them)
        with getattr(value, "fake_mode", None) or contextlib.nullcontext():
            for rows in (uncond_rows, cond_rows):
                rows.meta["example_value"] = torch.empty(value.shape[0] // 2, dtype=torch.long, device=value.device)
    with g.inserting_before(output):

        def rows_of(index: fx.Node) -> fx.Node:
            picked = g.call_function(torch.index_select, (pred, 0, index))
            return g.call_method("double", (g.call_method("flatten", (picked, 1)),))

        u, c = rows_of(uncond_rows), rows_of(cond_rows)
        sums = tuple(g.call_function(torch.sum, (g.call_function(operator.mul, (a, b)), 1))
                     for a, b in ((u, c), (u, u), (c, c)))
    output.args = (results + sums,)
    g.lint()
    out.recompile()
    return out


@dataclass
class GuidanceReport(PassReport):
    """Where Adaptive Guidance measures: in the compiled epilogue, or after the call."""

    pass_name = "guidance"

    epilogue: str | None

    def summary(self) -> str:
        if self.epilogue is None:
            return "guidance: the cosine of the two predictions is measured after the call (no epilogue output)"
        return f"guidance: the cosine of the two predictions is summed in {self.epilogue} (compiled)"


def offer(plan: Plan, guidance, ctx: PassContext | None = None) -> GuidanceReport:
    """Guidance skipping's pass: ``guidance.cosine`` on the epilogue when it returns the call's prediction."""
    last = plan.regions[-1]
    outputs = plan.io.region_outputs[-1]
    if last.region.kind != "epilogue" or plan.io.output_names[0] not in outputs:
        return GuidanceReport(None)
    pred = outputs.index(plan.io.output_names[0])
    # after re-batching (its row indices are not batch rows), and compiled: the sums are worth it fused
    plan.transforms[COSINE] = Transform(COSINE, lambda rm, gm: cosine_sums_variant(gm, pred), after_rows=True,
                                        compiled=True)
    plan.offers.setdefault(last.region.name, set()).add(COSINE)
    return GuidanceReport(last.region.name)
