"""Inline nested compile regions, so structure analysis always sees one flat graph.

A block whose forward is wrapped in ``torch.compiler.nested_compile_region`` is traced by Dynamo once and
stamped out for every other block of the same structure, which cuts the capture time of a deep model by the
number of blocks. The graph then holds, per block::

    %invoke_subgraph_3 = call_function[higher_order.invoke_subgraph](%subgraph_3, 'subgraph_0', %c, %w0, ..., %x)
    %x_4 = call_function[operator.getitem](%invoke_subgraph_3, 0)

This pass copies each called subgraph's nodes into the parent graph in place of the call (operands for its
placeholders, its outputs for the ``getitem`` users) and rewrites the copied nodes' ``nn_module_stack``
from the block the subgraph was traced in to the block that calls it, so blocks are told apart as before.

A region with a ``reuse_hash_fn`` is stamped out wherever its key matches, without Dynamo comparing the
operands to those it was traced with; a key that misses a difference (another width, another dtype) would
reuse the wrong subgraph. So every call's tensor operands are checked against the subgraph's placeholders
first, and a mismatch is a ``ValueError`` raised before the graph is changed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditfx.graph import meta
from ditfx.report import PassReport


@dataclass
class InlineReport(PassReport):
    """What :func:`inline_subgraph_calls` did: calls inlined, and how many distinct subgraphs they used."""

    pass_name = "inline"

    calls: int = 0
    subgraphs: int = 0

    def summary(self) -> str:
        return f"inlined {self.calls} nested-region calls of {self.subgraphs} traced subgraph(s)"


def is_subgraph_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph


def _stack_root(stack: dict) -> str:
    """The innermost module path of a stack: the module whose forward was called."""
    return list(stack.values())[-1][0] if stack else ""


def _restack(stack: dict, traced_root: str, call_stack: dict) -> dict:
    """Re-home a subgraph node's module stack from the traced block to the calling block."""
    call_root = _stack_root(call_stack)
    out = dict(call_stack)
    for key, (path, cls) in stack.items():
        if path.startswith(traced_root + "."):  # the block itself is the call stack's innermost entry
            out[f"{key}@{call_root}"] = (call_root + path[len(traced_root):], cls)
    return out


def _tensor_kind(node) -> tuple | None:
    """Shape, dtype and device of a tensor-valued node; None for other nodes and for symbolic shapes (comparing
    symbols would add guards)."""
    val = meta.tensor_value(node)
    if val is None or not all(isinstance(d, int) for d in val.shape):
        return None
    return tuple(val.shape), val.dtype, val.device


def _check_operands(call: fx.Node, identifier: str, placeholders: list[fx.Node], operands: list) -> None:
    """The call passes what the subgraph was traced for: as many operands, tensors of the same shape, dtype
    and device."""
    if len(placeholders) != len(operands):
        raise ValueError(f"{call.name}: subgraph {identifier} takes {len(placeholders)} inputs, "
                         f"the call passes {len(operands)}")
    for i, (placeholder, operand) in enumerate(zip(placeholders, operands)):
        traced, passed = _tensor_kind(placeholder), _tensor_kind(operand)
        if traced and passed and traced != passed:
            raise ValueError(
                f"{call.name} reuses subgraph {identifier}, traced for input {i} {placeholder.name} of shape, "
                f"dtype and device {traced}, but passes {passed} ({operand.name}); the region's reuse key "
                f"does not tell these calls apart: make its reuse_hash_fn include what differs")


def inline_subgraph_calls(gm: fx.GraphModule) -> InlineReport:
    """Replace every ``invoke_subgraph`` call in ``gm`` by the nodes of its subgraph (in place)."""
    report = InlineReport()
    traced_roots: dict[str, str] = {}  # identifier -> module path the subgraph was traced in
    used, holders = set(), set()
    calls = []
    for call in [n for n in gm.graph.nodes if is_subgraph_call(n)]:  # every call is checked before any change
        holder, identifier, *operands = call.args
        placeholders = [n for n in getattr(gm, holder.target).graph.nodes if n.op == "placeholder"]
        _check_operands(call, identifier, placeholders, operands)
        calls.append((call, placeholders))
    for call, placeholders in calls:
        # read again: an operand that was an earlier call's output is that call's inlined output by now
        holder, identifier, *operands = call.args
        sub = getattr(gm, holder.target)
        env = dict(zip(placeholders, operands))
        holders.add(holder.target)
        call_stack = call.meta.get("nn_module_stack") or {}
        traced_roots.setdefault(identifier, _stack_root(call_stack))
        with gm.graph.inserting_before(call):
            for node in sub.graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    outputs = [env[a] if isinstance(a, fx.Node) else a for a in node.args[0]]
                    break
                if node.op == "get_attr":  # constants of the subgraph move to the parent under a fresh name
                    name = f"{holder.target}_{node.target}".replace(".", "_")
                    setattr(gm, name, getattr(sub, node.target))
                    new = gm.graph.get_attr(name)
                else:
                    new = gm.graph.node_copy(node, env.__getitem__)
                new.meta = dict(node.meta)
                if "nn_module_stack" in node.meta:
                    new.meta["nn_module_stack"] = _restack(
                        node.meta["nn_module_stack"], traced_roots[identifier], call_stack)
                env[node] = new
        for user in list(call.users):
            if not (user.op == "call_function" and user.target is operator.getitem):
                raise ValueError(f"{call.name} is read by {user.format_node()}, not by getitem")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(call)
        if not holder.users:
            gm.graph.erase_node(holder)
        used.add(identifier)
        report.calls += 1
    report.subgraphs = len(used)
    if report.calls:
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in holders - still_read:
            delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
    return report
