"""The compiled artifacts of a package: which region variants a config needs, their exported programs with a
dynamic batch dimension, their AOTInductor models, and the handle the loaded runtime calls.

One artifact per region signature and variant (blocks of one structure share it: weights are inputs). The batch is
a dynamic dimension where the graph allows it (its batch literals read the input's size,
:func:`~ditfx.graph.rebatch.symbolic_batch`); a graph that does not allow it gets one static artifact per row
count the runtime can ask for. A dynamic artifact's batch ranges from 1 (export proves the graph valid there;
AOTInductor's own input check, which is off, would ask for 2); a static one serves batch 1 where export cannot
make the batch dynamic.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ditfx.package.manifest import PackageFile, is_dtype
from ditfx.plan import Plan, VariantUnavailable
from ditfx.runtime.rows import buckets

DYNAMIC = "dynamic"


@dataclass
class ArtifactEntry:
    """One compiled variant, as ``plan.json``'s artifact table lists it."""

    name: str
    signature: str
    transforms: tuple[str, ...]
    rows: int | str  # DYNAMIC, or the one row count it runs
    inputs: list  # per graph input: {"shape": [int | symbol], "dtype": str} for tensors, else the baked constant
    outputs: list  # per graph output: "tensor", or the constant it always is
    example: list  # the shapes of the tensor inputs it was exported with (to compile it again: programs keep none)

    def to_json(self) -> dict:
        return {**self.__dict__, "transforms": list(self.transforms)}

    @classmethod
    def from_json(cls, data: dict) -> ArtifactEntry:
        return cls(**{**data, "transforms": tuple(data["transforms"])})

    @classmethod
    def read(cls, data, file: PackageFile) -> ArtifactEntry:
        """The entry of a package's ``plan.json``, its shape checked (errors name ``file``)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        file.object(data, "an artifact entry", fields)
        name = data["name"]
        what = f"artifact {name!r}"
        file.check(isinstance(name, str) and name.endswith(".pt2") and name == Path(name).name
                   and not name.startswith("."), f"{what}: its name must be a .pt2 file name")
        file.check(isinstance(data["signature"], str) and _strings(data["transforms"]),
                   f"{what}: signature must be a string and transforms a list of strings")
        rows = data["rows"]
        file.check(rows == DYNAMIC or (type(rows) is int and rows >= 1), f"{what}: rows must be {DYNAMIC!r} or >= 1")
        file.check(isinstance(data["inputs"], list) and all(map(_input_spec, data["inputs"])),
                   f"{what}: inputs must be a list of {{'shape', 'dtype'}} or {{'constant'}} objects")
        file.check(isinstance(data["outputs"], list), f"{what}: outputs must be a list")
        file.check(isinstance(data["example"], list) and all(_ints(e) for e in data["example"]),
                   f"{what}: example must be a list of shapes")
        return cls.from_json(data)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _input_spec(spec) -> bool:
    if isinstance(spec, dict) and set(spec) == {"constant"}:
        return True
    return (isinstance(spec, dict) and set(spec) == {"shape", "dtype"} and is_dtype(spec["dtype"])
            and isinstance(spec["shape"], list)
            and all(isinstance(d, str) or (type(d) is int and d >= 0) for d in spec["shape"]))


# ------------------------------------------------------------------------------------------- building
def needed_variants(plan: Plan) -> list[tuple]:
    """(region, transforms) of every variant the plan's policies may run: each structure's graph and each transform
    it offers (policies run one transform at a time), once per signature."""
    seen, out = set(), []
    for rm in plan.regions:
        for transforms in [(), *((t,) for t in sorted(plan.offers.get(rm.region.name, ())))]:
            if (rm.signature, transforms) not in seen:
                seen.add((rm.signature, transforms))
                out.append((rm, transforms))
    return out


def needed_rows(plan: Plan) -> list[int]:
    """The row counts the runtime may run a region on: the captured batch, and where a policy computes fewer rows
    (guidance skipping, per-sample caching), every bucket it pads them to (the runtime's one rule,
    :func:`ditfx.runtime.rows.bucket`)."""
    n = plan.io.rows or 1
    return buckets(n) if plan.policies else [n]


def batch_flags(plan: Plan, rm, transforms: tuple[str, ...], gm) -> list[bool | None]:
    """Per input of the variant's graph: True where it carries the batch rows, False where not, None where its
    leading size follows the rows some other way (the row indices a measurement epilogue takes)."""
    flags = list(plan.io.region_batch[plan.regions.index(rm)])
    before = tuple(t for t in transforms if not plan.transforms[t].after_rows)
    n_before = _count_inputs(plan.graph(rm, plan.key(rm, before)))
    n_all = _count_inputs(gm)
    return flags + [True] * (n_before - len(flags)) + [None] * (n_all - n_before)


def _count_inputs(gm) -> int:
    return len(list(gm.graph.find_nodes(op="placeholder")))


def export_variant(plan: Plan, rm, transforms: tuple[str, ...], rows: int | str):
    """The variant as an exported program and its table entry (name left empty); raises VariantUnavailable, or
    ValueError where export refuses a dynamic batch."""
    from ditfx.graph import meta
    from ditfx.graph.rebatch import RebatchError, symbolic_batch

    captured = plan.io.rows
    gm = plan.graph(rm, plan.key(rm, transforms, captured if rows == DYNAMIC else rows))
    flags = batch_flags(plan, rm, transforms, gm)
    if rows == DYNAMIC:
        try:
            gm = symbolic_batch(gm, captured, [f is True for f in flags])
        except RebatchError as e:
            raise ValueError(str(e)) from e
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    example, constants = [], {}
    for k, p in enumerate(placeholders):
        v = meta.tensor_value(p)
        if v is None:
            constants[k] = meta.value(p)
            continue
        shape = list(v.shape)  # the captured shape; a re-batched graph keeps its placeholders' captured metadata
        if rows != DYNAMIC and rows != captured and flags[k] is not False and shape:
            shape[0] = shape[0] * rows // captured
        example.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
    it = iter(example)
    with torch.no_grad():  # which outputs are tensors (transforms add nodes without metadata): run it once
        ran = gm(*[constants[k] if k in constants else next(it) for k in range(len(placeholders))])
    outputs = ["tensor" if isinstance(o, torch.Tensor) else _constant(o) for o in ran]
    module = _TensorsOnly(gm, len(placeholders), constants, [o == "tensor" for o in outputs])
    dynamic_shapes = None
    if rows == DYNAMIC:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        tensor_flags = [f for k, f in enumerate(flags) if k not in constants]
        dynamic_shapes = (tuple({0: batch} if f is True else {0: torch.export.Dim.AUTO} if f is None
                                and example[j].dim() else None for j, f in enumerate(tensor_flags)),)
    with torch.no_grad():
        try:
            ep = torch.export.export(module, tuple(example), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - export refuses the dynamic batch: static artifacts instead
            if rows == DYNAMIC:
                raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            raise
    tensor_inputs = [n for n in ep.graph.find_nodes(op="placeholder")
                     if n.name in ep.graph_signature.user_inputs]
    shapes = [{"shape": [int(d) if isinstance(d, int) or d.node.is_constant() else str(d) for d in
                         n.meta["val"].shape], "dtype": str(n.meta["val"].dtype).removeprefix("torch.")}
              for n in tensor_inputs]
    it = iter(shapes)
    inputs = [{"constant": _constant(constants[k])} if k in constants else next(it) for k in range(len(placeholders))]
    if rows == DYNAMIC and not any(isinstance(d, str) for s in shapes for d in s["shape"]):
        raise ValueError("export specialised the batch dimension")
    return ep, ArtifactEntry("", rm.signature, transforms, rows, inputs, outputs, [list(e.shape) for e in example])


def _constant(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        raise VariantUnavailable(f"a region graph has a non-tensor input or output {value!r} that cannot be "
                                 "stored") from None


class _TensorsOnly(torch.nn.Module):
    """A region graph taking its tensor inputs only (the others are baked) and returning its tensor outputs."""

    def __init__(self, gm, n_inputs: int, constants: dict, tensor_outputs: list[bool]):
        super().__init__()
        self.gm = gm
        self.n_inputs = n_inputs
        self.constants = constants
        self.tensor_outputs = tensor_outputs

    def forward(self, *tensors):
        it = iter(tensors)
        args = [self.constants[k] if k in self.constants else next(it) for k in range(self.n_inputs)]
        outs = self.gm(*args)
        return tuple(o for o, keep in zip(outs, self.tensor_outputs) if keep)


def compile_artifact(ep, entry: ArtifactEntry, path: Path, program: Path) -> None:
    """AOTInductor-compile ``ep`` into the package file ``path`` (``.pt2``) and save the program to ``program``,
    without its example inputs (zeros as large as the weights; ``entry.example`` keeps their shapes)."""
    from torch._inductor import aoti_compile_and_package

    path.parent.mkdir(parents=True, exist_ok=True)
    program.parent.mkdir(parents=True, exist_ok=True)
    if ep.example_inputs is None:
        ep.example_inputs = (example_inputs(ep, entry), {})
    aoti_compile_and_package(ep, package_path=str(path))
    ep.example_inputs = None
    torch.export.save(ep, program)


def example_inputs(ep, entry: ArtifactEntry) -> tuple:
    """Zeros shaped like the inputs ``ep`` was exported with, on the program's device."""
    values = [n.meta["val"] for n in ep.graph.find_nodes(op="placeholder") if n.name in ep.graph_signature.user_inputs]
    return tuple(torch.zeros(shape, dtype=v.dtype, device=v.device) for shape, v in zip(entry.example, values))


# -------------------------------------------------------------------------------------------- running
class Artifact:
    """A loaded AOTInductor model behind the region call convention: all the graph's inputs in, its outputs out.

    AOTInductor checks nothing of its inputs (and bakes their strides in: a non-contiguous input silently gives
    wrong values), so every call is checked against the exported shapes and dtypes here and made contiguous."""

    def __init__(self, path: Path, entry: ArtifactEntry, device: torch.device):
        self.entry = entry
        self.path = path
        self.device = device
        index = device.index if device.index is not None else (-1 if device.type == "cpu" else 0)
        # the C++ loader: unlike torch._inductor's Python one, it imports neither Inductor nor Dynamo
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        self._checked: set[tuple] = set()

    def fits(self, args: list) -> str | None:
        """Why these region inputs do not fit this artifact, or None."""
        sizes: dict[str, int] = {}
        for k, (a, spec) in enumerate(zip(args, self.entry.inputs)):
            if "constant" in spec:
                if a != spec["constant"]:
                    return f"input {k} is {a!r}, exported as {spec['constant']!r}"
                continue
            if not isinstance(a, torch.Tensor):
                return f"input {k} is a {type(a).__name__}, exported as a tensor"
            if str(a.dtype).removeprefix("torch.") != spec["dtype"] or a.device.type != self.device.type:
                return f"input {k} is {a.dtype} on {a.device}, exported as {spec['dtype']} on {self.device.type}"
            shape = spec["shape"]
            if a.dim() != len(shape):
                return f"input {k} has shape {tuple(a.shape)}, exported as {shape}"
            for d, (got, want) in enumerate(zip(a.shape, shape)):
                if isinstance(want, str):
                    if sizes.setdefault(want, got) != got:
                        return f"input {k} has size {got} in dim {d}, other inputs {sizes[want]} ({want})"
                elif got != want:
                    return f"input {k} has shape {tuple(a.shape)}, exported as {shape}"
        return None

    def __call__(self, *args):
        tensors = [a.contiguous() for a in args if isinstance(a, torch.Tensor)]
        sizes = tuple(a.shape[0] if a.dim() else -1 for a in tensors)
        if sizes not in self._checked:  # once per row count: the shapes follow from the call's, checked already
            why = self.fits(list(args))
            if why is not None:
                raise ValueError(f"{self.path.name} ({self.entry.signature[:8]}, {list(self.entry.transforms)}, batch "
                                 f"{self.entry.rows}) cannot run these inputs: {why}")
            self._checked.add(sizes)
        outs = iter(self._loader.run(tensors))
        return tuple(next(outs) if o == "tensor" else o for o in self.entry.outputs)
