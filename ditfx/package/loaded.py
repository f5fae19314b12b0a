"""``ditfx.load``: a package run by the ordinary runtime over its compiled artifacts, with the model's call
signature; no Dynamo, no compiler, no model code."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from ditfx.package import manifest as manifest_io
from ditfx.package.artifacts import DYNAMIC, Artifact, ArtifactEntry
from ditfx.package.call import CallSpec
from ditfx.plan import Plan, VariantKey, VariantUnavailable


class PackagePlan(Plan):
    """A plan whose variants are compiled artifacts: the graph of a key is the artifact that runs it."""

    artifacts: dict[tuple, list[Artifact]]  # (signature, transforms) -> its artifacts (entries until loaded)

    def graph(self, rm, key: VariantKey):
        found = self._graphs.get(key)
        if found is not None:
            return found
        candidates = self.artifacts.get((key.signature, key.transforms), [])
        exact = [a for a in candidates if a.entry.rows == key.rows]
        dynamic = [a for a in candidates if a.entry.rows == DYNAMIC]
        chosen = (exact or dynamic or [None])[0]
        if chosen is None:
            raise VariantUnavailable(f"the package has no artifact for {rm.region.name} with {list(key.transforms)} "
                                     f"on {key.rows} rows (export the package with a config that runs it)")
        self._graphs[key] = chosen
        return chosen

    def input_values(self, rm, key: VariantKey) -> list:
        values = []
        for spec in self.graph(rm, key).entry.inputs:  # dynamic sizes at the key's rows
            if "constant" in spec:
                values.append(spec["constant"])
            else:
                shape = [key.rows if isinstance(d, str) else d for d in spec["shape"]]
                values.append(torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device="meta"))
        return values


class LoadedModel(torch.nn.Module):
    """A package as a module with the exported model's call signature: ``loaded(**kwargs)`` runs the ditfx
    runtime (the plan's policies) over the package's artifacts. ``.config``, ``.dtype`` and ``.device`` are the
    model's, so a diffusers pipeline takes it as its ``transformer``; ``cache_context`` relays the pipeline's
    branch names to the policies, as the hook of an optimized diffusers model does."""

    def __init__(self, path: Path, manifest: dict, call: CallSpec, executor, runtime, weights: dict,
                 device: torch.device):
        super().__init__()
        self.path = path
        self.manifest = manifest
        self.call_spec = call
        self.executor = executor
        self.ditfx_runtime = runtime
        self._weights = weights
        self._device = device
        self.config = _Config(call.config or {})
        self._by_rows: dict[int, object] = {}
        # per graph input: (shape, dtype) of the argument it is, or None (a weight)
        self._input_meta = [None if (spec := call.tensors.get(entry.get("argument"))) is None
                            else (tuple(spec["shape"]), getattr(torch, spec["dtype"])) for entry in call.inputs]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.call_spec.dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def null_class(self) -> int | None:
        """The class label of the unconditional branch (class-conditional models), as ditfx found it at export."""
        return self.executor.plan.null_class

    def forward(self, *args, **kwargs):
        inputs, return_dict = self.call_spec.graph_inputs(args, kwargs, self._weights)
        result = self._executor(self._rows(inputs))(*inputs)
        return self.call_spec.result(result, return_dict)

    def _rows(self, inputs: list) -> int | None:
        """The call's batch rows, its inputs checked against the plan: nothing else checks them (no Dynamo guards;
        AOTInductor checks nothing). The rows may differ from the exported call's where every region has a
        dynamic-batch artifact; every other size, the dtype and the device must be the exported ones."""
        io = self.executor.io
        rows = None
        for name, x, meta, batch in zip(io.input_names, inputs, self._input_meta, io.input_batch):
            if meta is None:
                continue
            shape, dtype = meta
            same = x.dim() == len(shape) and tuple(x.shape[1:]) == shape[1:] and (batch or x.shape[0] == shape[0])
            if not same or x.dtype != dtype or x.device.type != self._device.type:
                raise ValueError(f"{self._source(name)}: got a {x.dtype} tensor of shape {tuple(x.shape)} on "
                                 f"{x.device}, this package was exported for {dtype} {shape} on {self._device}"
                                 f"{' (the batch may vary)' if batch and self._any_batch else ''}: export it again "
                                 "with example inputs of this shape")
            if batch:
                if x.shape[0] == 0:
                    raise ValueError(f"{self._source(name)} has 0 rows (shape {tuple(x.shape)}): a call needs at least "
                                     "one row; leave out calls with nothing to compute")
                if rows is not None and x.shape[0] != rows:
                    raise ValueError(f"{self._source(name)} has {x.shape[0]} rows, other inputs {rows}")
                rows = x.shape[0]
        if rows is not None and rows != io.rows and not self._any_batch:
            raise ValueError(f"this package was exported for calls of {io.rows} rows and some of its graphs cannot "
                             f"take another batch; got {rows}: export it again with example inputs of {rows} rows")
        return rows

    def _executor(self, rows: int | None):
        """The executor of the plan at ``rows`` batch rows (one per batch size, sharing the runtime: as Dynamo
        recompiles for a new batch, without compiling)."""
        if rows is None or rows == self.executor.io.rows:
            return self.executor
        found = self._by_rows.get(rows)
        if found is None:
            from ditfx.runtime.executor import Executor

            plan = _plan_at_rows(self.executor.plan, rows)
            found = self._by_rows[rows] = Executor(plan, self.ditfx_runtime, [], compile_edges=True)
        return found

    @property
    def _any_batch(self) -> bool:
        """Whether every region (of every mode) has a dynamic-batch artifact."""
        plans = [self.executor.plan, *self.executor.plan.modes.values()]
        return all(any(a.entry.rows == DYNAMIC for a in p.artifacts.get((rm.signature, ()), []))
                   for p in plans for rm in p.regions)

    def _source(self, name: str) -> str:
        k = self.executor.io.input_names.index(name)
        entry = self.call_spec.inputs[k]
        return f"argument {entry['argument']}" if "argument" in entry else f"input {name}"

    @contextlib.contextmanager
    def cache_context(self, name: str, **details):
        """The pipeline names the branch of the calls inside (diffusers' ``CacheMixin.cache_context``; the step
        details some pipelines add are not needed: the lifecycle places the call from its timestep)."""
        lifecycle = self.ditfx_runtime.lifecycle
        lifecycle.pipeline_signals = True  # a caller that names its branches is a pipeline: it states them
        lifecycle.set_context(name)
        try:
            yield
        finally:
            lifecycle.set_context(None)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Diffusers pipelines call this at the end of every generation: its state is freed."""
        self.ditfx_runtime.lifecycle.end_generation()

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, model={self.manifest['model_class']}, device={self._device}"


class _Config(dict):
    """The model's config, readable as attributes (``config.in_channels``) and keys, as diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def load(path, device=None, verify: bool = True) -> LoadedModel:
    """The package at ``path`` as a module with the exported model's call signature (see :class:`LoadedModel`).

    ``device``: where to run (default: the device it was exported for); a package runs only on the device type,
    GPU architecture or CPU ISA and torch version it was built with, and says so. ``verify``: check every file's
    digest against the manifest first."""
    from ditfx.runtime.compiler import RegionCompiler
    from ditfx.runtime.executor import Executor
    from ditfx.runtime.state import ModelRuntime

    path = Path(path)
    device = torch.device(device) if device is not None else None
    manifest = manifest_io.read(path, device, verify=verify)
    device = device or torch.device(manifest["device"])
    call, plan = read_package(path, manifest)
    weights = _weights(path, call, device)
    for p in plans(plan):
        p.mode_inputs = {name: [t.to(device) for t in tensors] for name, tensors in p.mode_inputs.items()}
        p.artifacts = {key: [_artifact(path, entry, device) for entry in entries]
                       for key, entries in p.artifacts.items()}
    runtime = ModelRuntime()
    runtime.compiler = RegionCompiler("eager")  # the artifacts are compiled: run them as they are
    inputs = [weights.get(e["weight"]) if "weight" in e else None for e in call.inputs]
    executor = Executor(plan, runtime, inputs, compile_edges=True)
    runtime.executors.append(executor)
    return LoadedModel(path, manifest, call, executor, runtime, weights, device)


def read_package(path: Path, manifest: dict) -> tuple[CallSpec, PackagePlan]:
    """The call spec and the plan of the package at ``path`` (``manifest``: its manifest, read), every JSON file's
    shape checked first (a :class:`~ditfx.package.manifest.PackageError` naming the file and the ditfx that wrote
    it); the plans' ``artifacts`` hold the artifacts' entries, not yet their compiled models."""
    call = CallSpec.read(manifest_io.PackageFile(path / "call.json", manifest["ditfx"]))
    return call, _read_plan(path / "plan", manifest["ditfx"])


def plans(plan: Plan) -> list[Plan]:
    """``plan`` and the plans of its modes, at every depth."""
    return [plan, *(p for mode in plan.modes.values() for p in plans(mode))]


# the keys of a package's plan.json (ditfx.plan_io.plan_to_json's, and the artifact table): any other is a newer
# ditfx's, which this one would ignore and so run the package differently
PLAN_REQUIRED = ("format", "io", "blocks", "regions", "flops", "transforms", "offers", "policies", "null_class",
                 "artifacts")
PLAN_OPTIONAL = ("torch", "unavailable", "tokens", "modes")
REGION_KEYS = ("name", "kind", "signature", "block", "outputs", "streams", "primary_stream", "latent_stream")
CONTAINERS = {"io": dict, "blocks": list, "regions": list, "flops": dict, "transforms": dict, "offers": dict,
              "policies": list, "artifacts": list, "modes": list, "unavailable": dict}


def _read_plan(directory: Path, written_by: str) -> PackagePlan:
    from ditfx.plan_io import plan_from_json

    file = manifest_io.PackageFile(directory / "plan.json", written_by)
    data = _plan_json(file)
    entries = [ArtifactEntry.read(e, file) for e in data["artifacts"]]
    try:
        plan = plan_from_json(data, directory, _no_graph, lambda d: _read_plan(d, written_by), plan_class=PackagePlan)
    except manifest_io.PackageError:  # a mode's plan: named already
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a shape the checks above let by
        raise file.error(f"cannot be read ({type(e).__name__}: {e})") from e
    plan.artifacts = {}
    for entry in entries:
        plan.artifacts.setdefault((entry.signature, entry.transforms), []).append(entry)
    return plan


def _plan_json(file: manifest_io.PackageFile) -> dict:
    """A package's plan JSON, its keys checked (plan_io reads the values)."""
    from ditfx.plan_io import READS

    data = file.read()
    fmt = data.get("format") if isinstance(data, dict) else None
    file.check(fmt in READS, f"format {fmt!r}; this ditfx reads {' or '.join(READS)}")
    optional = PLAN_OPTIONAL + (("state",) if fmt == READS[0] else ())  # /1 recorded policy state that is not read
    file.object(data, "the plan", PLAN_REQUIRED, optional)
    for key, kind in CONTAINERS.items():
        file.check(isinstance(data.get(key, kind()), kind),
                   f"{key} must be a JSON {'object' if kind is dict else 'array'}")
    for region in data["regions"]:
        file.object(region, "a region", REGION_KEYS)
    for transform in data["transforms"].values():
        file.object(transform, "a transform", ("after_rows",), ("compiled",))
    for policy in data["policies"]:
        file.object(policy, "a policy", ("type",), ("fields",))
    return data


def _weights(path: Path, call: CallSpec, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {k: t.to(device) for k, t in load_file(str(path / "weights.safetensors")).items()}
    missing = [e["weight"] for e in call.inputs if "weight" in e and e["weight"] not in weights]
    if missing:
        raise manifest_io.PackageError(f"{path / 'weights.safetensors'} lacks {missing[:5]}, which call.json reads: "
                                       "export the package again")
    return weights


def _artifact(path: Path, entry: ArtifactEntry, device: torch.device) -> Artifact:
    file = path / "artifacts" / entry.name
    if not file.is_file():
        raise manifest_io.PackageError(f"{file} is missing (the plan's artifact table names it): export the package "
                                       "again")
    return Artifact(file, entry, device)


def _plan_at_rows(plan: PackagePlan, rows: int) -> PackagePlan:
    """The plan for calls of ``rows`` batch rows, over the same (dynamic-batch) artifacts."""
    old = plan.io.rows

    def scaled(meta):
        if meta is None or not meta[0] or meta[0][0] != old:
            return meta
        return ((rows, *meta[0][1:]), *meta[1:])

    io = dataclasses.replace(plan.io, rows=rows, output_meta=[scaled(m) for m in plan.io.output_meta])
    out = dataclasses.replace(plan, io=io, flops={k: v * rows // old for k, v in plan.flops.items()},
                              modes={k: _plan_at_rows(m, rows) for k, m in plan.modes.items()}, _graphs={},
                              _refused={})
    out.artifacts = plan.artifacts
    return out


def _no_graph(key):
    raise VariantUnavailable("a package runs its compiled artifacts; it holds no graphs to build others from")
