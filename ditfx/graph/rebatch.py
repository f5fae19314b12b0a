"""Re-batching: a region graph captured at ``rows`` batch rows, specialised to another row count.

Guidance skipping runs the denoiser on a subset of a call's rows (the conditional rows, plus the unconditional
rows of samples still on full guidance). Dynamo captured the graph with static shapes, so the batch size is a
literal in the leading position of size arguments::

    view(x, 14, -1, 4, 32)          ->  view(x, 9, -1, 4, 32)       (x: (14, T, D) -> (9, T, D))
    reshape(x, (14, 16, 3, 4, 16))  ->  reshape(x, (9, 16, 3, 4, 16))

Only a leading literal equal to ``rows`` of a node whose value has ``rows`` leading rows is rewritten; and the
``output_size`` of a ``repeat_interleave`` along the batch (dim 0, or flattened), which is the node's captured
size there and a multiple of ``rows`` (diffusers' attention mask, repeated per head)::

    repeat_interleave(mask, 2, dim=0, output_size=28)  ->  repeat_interleave(mask, 2, dim=0, output_size=18)

The result
is then checked by shape propagation with fake tensors: each value's shape may differ from the captured one in at
most one dimension (the batch, wherever permutes moved it or flattens merged it), by the factor new/old rows.
Literals are only rewritten in nodes computed from the batch inputs or read by them, so a position table that
happens to have ``rows`` entries keeps its size. Any mismatch (a literal that was not the batch, an op that
mixes rows) refuses the variant, and guidance skipping falls back to full guidance: never a wrong shape.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ditfx.graph import meta

SIZE_METHODS = {"view", "reshape", "expand", "repeat", "new_zeros", "new_ones", "new_empty", "new_full"}
SIZE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full}


class RebatchError(ValueError):
    """The graph cannot be specialised to another batch size safely."""


def _leading_rows(node: fx.Node) -> int | None:
    v = meta.tensor_value(node)
    return v.shape[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else None


def _sizes_position(node: fx.Node) -> int | None:
    """Index in ``node.args`` where the size list starts (varargs sizes or one tuple), or None."""
    if node.op == "call_method" and node.target in SIZE_METHODS:
        return 1
    if node.op == "call_function" and node.target in SIZE_FUNCTIONS:
        return 1 if node.target is torch.reshape else 0
    return None


def _replace_leading(sizes, rows: int, new_rows: int):
    if isinstance(sizes, (tuple, list)) and sizes and sizes[0] == rows:
        return type(sizes)([new_rows, *sizes[1:]])
    return sizes


def _rewrite_constant_rows(node: fx.Node, rows: int, new_rows: int) -> None:
    """``torch.tensor([g, g, g, g])``: a per-sample constant Dynamo folded from ``[g] * batch``."""
    if node.op == "call_function" and node.target is torch.tensor and node.args:
        values = node.args[0]
        if isinstance(values, (list, tuple)) and len(values) == rows and len(set(map(repr, values))) == 1:
            if isinstance(new_rows, fx.Node):
                raise RebatchError(f"{node.format_node()} is a per-sample constant of {rows} values; it cannot "
                                   "take a symbolic batch size")
            node.args = (type(values)([values[0]] * new_rows), *node.args[1:])


def _is_repeat_interleave(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "repeat_interleave")
            or (node.op == "call_function"
                and node.target in (torch.repeat_interleave, torch.Tensor.repeat_interleave)))


def _rewrite_output_size(node: fx.Node, rows: int, new_rows: int) -> None:
    """``x.repeat_interleave(heads, dim=0, output_size=rows * heads)``: ``output_size`` is the output's size along
    ``dim``, which Dynamo folded to a literal; along the batch it scales with the rows."""
    if not _is_repeat_interleave(node):
        return
    size = node.kwargs.get("output_size")
    value = meta.tensor_value(node)
    if not isinstance(size, int) or isinstance(size, bool) or value is None or value.dim() == 0:
        return
    dim = node.kwargs["dim"] if "dim" in node.kwargs else (node.args[2] if len(node.args) > 2 else None)
    if dim not in (0, None):  # flattened (dim None): a 1-d output whose leading size is every element
        return
    if size == value.shape[0] and size % rows == 0:
        if isinstance(new_rows, fx.Node):  # symbolic rows: the product is a node of the graph
            with node.graph.inserting_before(node):
                node.update_kwarg("output_size", node.graph.call_function(operator.mul, (new_rows, size // rows)))
        else:
            node.update_kwarg("output_size", size // rows * new_rows)


def _rewrite_sizes(node: fx.Node, rows: int, new_rows: int) -> None:
    _rewrite_constant_rows(node, rows, new_rows)
    _rewrite_output_size(node, rows, new_rows)
    pos = _sizes_position(node)
    if pos is None or _leading_rows(node) != rows:
        return
    for key in ("shape", "size"):
        if key in node.kwargs:
            node.update_kwarg(key, _replace_leading(node.kwargs[key], rows, new_rows))
    if pos >= len(node.args):
        return
    args = list(node.args)
    first = args[pos]
    if first == rows and not isinstance(first, bool):
        args[pos] = new_rows
    else:
        args[pos] = _replace_leading(first, rows, new_rows)
    node.args = tuple(args)


def _batch_related(gm: fx.GraphModule, rows: int, batch_inputs: list[bool]) -> set[fx.Node]:
    """Nodes computed from the batch inputs, and the batch-sized nodes that feed them, transitively
    (``torch.zeros(B)`` embedded and concatenated with the timestep embedding, ``pad.repeat(B, 1, 1)``): the only
    places a batch literal can be. A position table that does not feed the batch keeps its size."""
    derived: set[fx.Node] = set()
    for p, flag in zip(gm.graph.find_nodes(op="placeholder"), batch_inputs):
        if flag:
            derived.add(p)
    for node in gm.graph.nodes:
        if any(a in derived for a in node.all_input_nodes):
            derived.add(node)
    related = set(derived)
    for node in reversed(list(gm.graph.nodes)):
        if node in related:
            for a in node.all_input_nodes:
                if a.op != "placeholder" and (a in derived or _leading_rows(a) == rows
                                              or _sizes_position(a) is not None):
                    related.add(a)
    return related


def rebatch(gm: fx.GraphModule, rows: int, new_rows: int, batch_inputs: list[bool]) -> fx.GraphModule:
    """A copy of ``gm`` for ``new_rows`` rows on the inputs flagged in ``batch_inputs``; raises RebatchError."""
    out = copy.deepcopy(gm)
    related = _batch_related(out, rows, batch_inputs)
    for node in out.graph.nodes:
        if node in related:
            _rewrite_sizes(node, rows, new_rows)
    out.recompile()
    check_shapes(out, rows, new_rows, batch_inputs)
    return out


def check_shapes(gm: fx.GraphModule, rows: int, new_rows: int, batch_inputs: list[bool]) -> None:
    """Propagate fake inputs with ``new_rows`` rows; every node must have its captured shape, rescaled."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values: dict[fx.Node, object] = {}
    with mode:
        for p, is_batch in zip(placeholders, batch_inputs):
            v = meta.tensor_value(p)
            if isinstance(v, torch.Tensor):
                shape = (new_rows, *v.shape[1:]) if is_batch else tuple(v.shape)
                values[p] = torch.empty(shape, dtype=v.dtype, device=v.device)
            else:
                values[p] = v
        interp = fx.Interpreter(gm)
        env = interp.env
        env.update(values)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            try:
                env[node] = interp.run_node(node)
            except Exception as e:  # noqa: BLE001 - any failure means the variant is not safe
                raise RebatchError(f"{node.format_node()} fails at {new_rows} rows: {e}") from e
            _check_node(node, env[node], rows, new_rows)


def _check_node(node: fx.Node, value, rows: int, new_rows: int) -> None:
    captured = meta.tensor_value(node)
    if not isinstance(captured, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    old, new = tuple(captured.shape), tuple(value.shape)
    # The batch dimension may move (permute, unsqueeze) or be merged with others (flatten), but it is the only
    # dimension that may change, and it changes by the factor new_rows / rows.
    changed = [d for d, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(old) != len(new) or len(changed) > 1 or any(old[d] % rows or new[d] != old[d] // rows * new_rows
                                                       for d in changed):
        raise RebatchError(f"{node.format_node()} has shape {new} at {new_rows} rows, captured {old} at {rows}: "
                           "the batch size is not the only thing that changes")


def symbolic_batch(gm: fx.GraphModule, rows: int, batch_inputs: list[bool]) -> fx.GraphModule:
    """A copy of ``gm`` whose batch literals read the leading size of its first batch input, for export with a
    dynamic batch dimension (``view(x, 14, -1)`` -> ``view(x, x.size(0), -1)``); raises RebatchError.

    The same literals as :func:`rebatch` are rewritten; export then checks that nothing else depends on the
    batch size (a literal missed here specialises the dimension, and export refuses the dynamic one)."""
    out = copy.deepcopy(gm)
    related = _batch_related(out, rows, batch_inputs)
    placeholders = list(out.graph.find_nodes(op="placeholder"))
    first = next((p for p, flag in zip(placeholders, batch_inputs) if flag), None)
    if first is None:
        raise RebatchError("the graph has no batch input")
    with out.graph.inserting_after(placeholders[-1]):
        batch = out.graph.call_method("size", (first, 0))
    for node in list(out.graph.nodes):
        if node in related:
            _rewrite_sizes(node, rows, batch)
    out.graph.lint()
    out.recompile()
    return out
