"""Re-specialising a static graph to another token count.

Dynamo captures with static shapes, so sizes are literals in the graph: ``reshape(qkv, 2, 64, 3, 4, 32)``,
``x[:, :64]`` (the image part of a joint text+image sequence), ``reshape(x, -1, 8, 8, 2, 2, 4)`` (unpatchify).
When the patch embedding is made coarser the token count changes from N to N', and every literal that was
derived from it must follow. Values alone cannot tell (a head dimension of 64 and 64 tokens look alike), so each
literal is placed by where it sits:

* ``view``/``reshape``/``unflatten``: input and output dimensions are grouped by equal running products at the
  captured sizes; a group whose input did not change keeps its literals, a merge takes the new product, and a
  split of a changed dimension takes the one assignment of old -> new values (from the dimensions that changed
  so far, plus the seeds: the grid sides and the patch size) whose product is the new size;
* ``expand``/``repeat``: a literal that equals its (changed) input dimension follows it;
* slices, ``split`` sizes, ``arange`` ends and the sizes of new tensors: by the value map, only where it is
  unambiguous.

Every node is run on fake tensors as it is rewritten, so the result carries new shape metadata; a literal that
cannot be placed, or an op that fails at the new sizes, raises :class:`RetokenError` naming the node.
"""
from __future__ import annotations

import math
import operator
from itertools import product

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ditfx.graph import meta

RESHAPES = {"view", "reshape"}
EXPANDS = {"expand", "repeat"}
NEW_SIZED = {"new_zeros", "new_ones", "new_empty", "new_full"}
SIZED_FUNCTIONS = {torch.zeros, torch.ones, torch.empty, torch.full, torch.randn}


class RetokenError(ValueError):
    """The graph cannot be specialised to the new token count safely; the message names the node."""


class ValueMap:
    """Captured size -> new size, learnt from every dimension that changed; a size seen to map to two different
    new sizes is ambiguous and maps to nothing."""

    def __init__(self, seeds: dict[int, int]):
        self._map: dict[int, int | None] = dict(seeds)

    def learn(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        if len(old) != len(new):
            return
        for a, b in zip(old, new):
            if a != b:
                known = self._map.get(a, b)
                self._map[a] = b if known == b else None

    def get(self, value: int) -> int | None:
        return self._map.get(value)

    def options(self, value: int) -> list[int]:
        new = self._map.get(value)
        return [value] if new is None or new == value else [value, new]


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _groups(old_in: tuple[int, ...], old_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dimensions with equal products (size-1 dimensions join the run before)."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and (gi or gj) and not (i < len(old_in) and old_in[i] == 1 and gi) \
                    and not (j < len(old_out) and old_out[j] == 1 and gj):
                break
            if pi <= pj and i < len(old_in):
                gi.append(i)
                pi *= old_in[i]
                i += 1
            elif j < len(old_out):
                gj.append(j)
                pj *= old_out[j]
                j += 1
            elif i < len(old_in):
                gi.append(i)
                pi *= old_in[i]
                i += 1
            else:
                break
        groups.append((gi, gj))
    return groups


def _reshape_sizes(node: fx.Node, sizes: list[int], old_in, new_in, old_out, values: ValueMap) -> list[int]:
    """New literals for a reshape of ``old_in`` to ``sizes`` (captured output ``old_out``), now of ``new_in``."""
    if tuple(old_in) == tuple(new_in):
        return sizes
    new_sizes = list(sizes)
    for gi, gj in _groups(tuple(old_in), tuple(old_out)):
        old_p, new_p = _prod(old_in[i] for i in gi), _prod(new_in[i] for i in gi)
        if old_p == new_p or not gj:
            continue
        if len(gj) == 1:
            if sizes[gj[0]] != -1:
                new_sizes[gj[0]] = new_p
            continue
        literal = [sizes[j] for j in gj]
        # an inferred (-1) size is placed like the others, from its captured value, and stays -1
        choices = [values.options(old_out[j] if v == -1 else v) for j, v in zip(gj, literal)]
        fits = {c for c in product(*choices) if _prod(c) == new_p}
        if len(fits) != 1:
            what = "no assignment" if not fits else f"{len(fits)} assignments"
            raise RetokenError(f"{node.format_node()}: cannot tell how the changed size {old_p} -> {new_p} splits "
                               f"into {literal} ({what} of the known size changes fit)")
        for j, v in zip(gj, fits.pop()):
            new_sizes[j] = -1 if sizes[j] == -1 else v
    return new_sizes


def _flat_sizes(args, start: int) -> tuple[list, bool]:
    """The size literals of a sizes-taking call from ``args[start:]`` (varargs or one sequence)."""
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0]), True
    return list(rest), False


def _put_sizes(args, start: int, sizes: list, packed: bool) -> tuple:
    return (*args[:start], tuple(sizes)) if packed else (*args[:start], *sizes)


def _shape(v) -> tuple[int, ...] | None:
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _map_int(v, values: ValueMap):
    """A size literal of a new tensor: its new value where a known size change explains it."""
    if isinstance(v, bool) or not isinstance(v, int):
        return v
    new = values.get(v)
    return v if new is None else new


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, values: ValueMap):
        self.gm = gm
        self.values = values
        self.env: dict[fx.Node, object] = {}
        self.parts: dict[tuple[int, int], dict[int, int]] = {}  # joined sizes -> part boundaries

    def old(self, n) -> tuple[int, ...] | None:
        return _shape(meta.tensor_value(n)) if isinstance(n, fx.Node) else None

    def new(self, n) -> tuple[int, ...] | None:
        return _shape(self.env.get(n)) if isinstance(n, fx.Node) else None

    def changed(self, node: fx.Node) -> bool:
        return any(self.old(a) is not None and self.old(a) != self.new(a) for a in node.all_input_nodes)

    def rewrite(self, node: fx.Node) -> None:
        if not self.changed(node) or ("example_value" not in node.meta and "val" not in node.meta):
            return  # unchanged inputs, or a node the conversion added, written at the new sizes
        t, args = node.target, node.args
        if node.op == "call_method" and t in RESHAPES:
            sizes, packed = _flat_sizes(args, 1)
            if "shape" in node.kwargs:
                sizes, packed = list(node.kwargs["shape"]), True
            new = _reshape_sizes(node, sizes, self.old(args[0]), self.new(args[0]), self.old(node), self.values)
            if "shape" in node.kwargs:
                node.update_kwarg("shape", tuple(new))
            else:
                node.args = _put_sizes(args, 1, new, packed)
        elif node.op == "call_function" and t is torch.reshape:
            sizes = list(args[1]) if len(args) > 1 else list(node.kwargs["shape"])
            new = _reshape_sizes(node, sizes, self.old(args[0]), self.new(args[0]), self.old(node), self.values)
            if len(args) > 1:
                node.args = (args[0], tuple(new))
            else:
                node.update_kwarg("shape", tuple(new))
        elif node.op == "call_method" and t == "unflatten":
            self._unflatten(node)
        elif node.op == "call_method" and t in EXPANDS:
            self._expand(node)
        elif node.op == "call_function" and t is operator.getitem and isinstance(args[0], fx.Node):
            self._getitem(node)
        elif (node.op == "call_method" and t in ("split", "split_with_sizes")) or (
                node.op == "call_function" and t in (torch.split, torch.functional.split)):
            self._split(node)
        elif (node.op == "call_method" and t in NEW_SIZED) or (node.op == "call_function" and t in SIZED_FUNCTIONS):
            start = 1 if node.op == "call_method" else 0
            sizes, packed = _flat_sizes(args, start)
            node.args = _put_sizes(args, start, [_map_int(s, self.values) for s in sizes], packed)
        elif node.op == "call_method" and t == "repeat_interleave" and "output_size" in node.kwargs:
            self._repeat_interleave(node)

    def _repeat_interleave(self, node: fx.Node) -> None:
        """``output_size`` is the repeated dimension's new size: the input's (new) size there times the repeats."""
        x, repeats = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        new_in = self.new(x)
        if not isinstance(repeats, int) or new_in is None:
            raise RetokenError(f"{node.format_node()}: cannot recompute output_size at the new token count")
        size = (new_in[dim] if dim is not None else math.prod(new_in)) * repeats
        node.update_kwarg("output_size", size)

    def _unflatten(self, node: fx.Node) -> None:
        x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = list(node.args[2] if len(node.args) > 2 else node.kwargs["sizes"])
        old_in, new_in = self.old(x), self.new(x)
        d = dim % len(old_in)
        if old_in[d] == new_in[d]:
            return
        before = list(old_in[:d]) + [old_in[d]] + list(old_in[d + 1:])
        old_out = self.old(node)
        new = _reshape_sizes(node, list(before[:d]) + sizes + list(before[d + 1:]), old_in, new_in, old_out,
                             self.values)[d:d + len(sizes)]
        if len(node.args) > 2:
            node.args = (x, dim, tuple(new))
        else:
            node.update_kwarg("sizes", tuple(new))

    def _expand(self, node: fx.Node) -> None:
        sizes, packed = _flat_sizes(node.args, 1)
        old_in, new_in = self.old(node.args[0]), self.new(node.args[0])
        offset = len(sizes) - len(old_in)
        out = []
        for k, s in enumerate(sizes):
            i = k - offset
            if node.target == "expand" and i >= 0 and s == old_in[i] and s != -1:
                out.append(new_in[i])
            elif node.target == "expand" and i >= 0 and old_in[i] != 1:
                out.append(s)
            else:
                out.append(_map_int(s, self.values))
        node.args = _put_sizes(node.args, 1, out, packed)

    def _getitem(self, node: fx.Node) -> None:
        x, index = node.args
        old_in, new_in = self.old(x), self.new(x)
        items = index if isinstance(index, tuple) else (index,)
        if old_in is None or Ellipsis in items:
            return
        new_items, d = [], 0
        for item in items:
            if item is not None:
                if d < len(old_in) and old_in[d] != new_in[d]:
                    if isinstance(item, slice):
                        item = slice(*(self._bound(b, old_in[d], new_in[d], node) for b in (item.start, item.stop)),
                                     item.step)
                    elif isinstance(item, int):
                        item = self._bound(item, old_in[d], new_in[d], node)
                d += 1
            new_items.append(item)
        node.args = (x, tuple(new_items) if isinstance(index, tuple) else new_items[0])

    def _bound(self, b, old: int, new: int, node: fx.Node):
        """A slice bound (or index) along a dimension that changed from ``old`` to ``new``."""
        if b is None or not isinstance(b, int) or b == 0:
            return b
        if abs(b) == old:
            return new if b > 0 else -new
        cuts = self.parts.get((old, new))
        if cuts is not None:  # a concatenation (text + image tokens): its parts' boundaries move with the parts
            pos = b if b > 0 else old + b
            if pos not in cuts:
                raise RetokenError(f"{node.format_node()}: bound {b} is inside a part of the joined sequence "
                                   f"{old} -> {new}, not at a part's boundary {sorted(cuts)}")
            return cuts[pos] if b > 0 else cuts[pos] - new
        mapped = self.values.get(abs(b))
        if mapped is None:
            raise RetokenError(f"{node.format_node()}: cannot tell what bound {b} of the changed size {old} -> "
                               f"{new} becomes")
        return mapped if b > 0 else -mapped

    def observe(self, node: fx.Node) -> None:
        """Record the parts of a concatenation along a changed dimension (their boundaries, old -> new)."""
        if not (node.op == "call_function" and node.target is torch.cat):
            return
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        old, new = self.old(node), self.new(node)
        if old is None or new is None:
            return
        d = dim % len(old)
        if old[d] == new[d]:
            return
        olds = [self.old(t) for t in tensors]
        if sum(o is None for o in olds) > 1:
            return
        known = sum(o[d] for o in olds if o is not None)  # a part new to the graph had the rest of the old size
        cuts, a, b = {}, 0, 0
        for t, o in zip(tensors, olds):
            a, b = a + (o[d] if o is not None else old[d] - known), b + self.new(t)[d]
            cuts[a] = b
        self.parts[(old[d], new[d])] = cuts

    def _split(self, node: fx.Node) -> None:
        x, sizes = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        if not isinstance(sizes, (list, tuple)):
            return
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        old_in, new_in = self.old(x), self.new(x)
        d = dim % len(old_in)
        if old_in[d] == new_in[d]:
            return
        cuts = self.parts.get((old_in[d], new_in[d]))
        if cuts is not None:
            ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
            if any(e not in cuts for e in ends):
                raise RetokenError(f"{node.format_node()}: the split {list(sizes)} of the joined sequence does not "
                                   f"fall on its parts' boundaries {sorted(cuts)}")
            new_ends = [cuts[e] for e in ends]
            node.args = (x, [e - s for s, e in zip([0, *new_ends[:-1]], new_ends)], *node.args[2:])
            return
        options = [self.values.options(s) for s in sizes]
        fits = {c for c in product(*options) if sum(c) == new_in[d]}
        if len(fits) != 1:
            raise RetokenError(f"{node.format_node()}: cannot tell how {old_in[d]} -> {new_in[d]} splits into "
                               f"{list(sizes)}")
        node.args = (x, list(fits.pop()), *node.args[2:])


def retoken(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], seeds: dict[int, int]) -> fx.GraphModule:
    """Rewrite ``gm`` in place for new input shapes (``inputs``: fake or real tensors for the placeholders whose
    shapes or values are new; the others keep their captured metadata) and refresh every node's metadata.

    ``seeds``: captured size -> new size pairs known up front (the grid sides, the patch size)."""
    values = ValueMap(seeds)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    rw = _Rewriter(gm, values)
    interp = fx.Interpreter(gm)
    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                v = inputs.get(node.name, meta.value(node))
                if isinstance(v, torch.Tensor):
                    v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                rw.env[node] = v
            elif node.op == "output":
                continue
            else:
                rw.rewrite(node)
                interp.env = rw.env
                try:
                    rw.env[node] = interp.run_node(node)
                except Exception as e:  # noqa: BLE001 - any failure means the specialisation is not safe
                    raise RetokenError(f"{node.format_node()} fails at the new token count: {e}") from e
                rw.observe(node)
            old, new = rw.old(node), rw.new(node)
            if old is not None and new is not None:
                values.learn(old, new)
    for node in gm.graph.nodes:
        if node in rw.env:
            node.meta["example_value"] = rw.env[node]
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
    gm.recompile()
    return gm
