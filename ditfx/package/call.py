"""The call interface of an exported model: how a call's arguments become the graph's inputs and the graph's
outputs the call's result, without the model's code.

Recorded at export from the captured call (each graph input is matched to the argument or weight it is, by
identity), checked and applied at every call of the loaded model. The non-tensor arguments were constants to the
captured graph (Dynamo specialised on them), so a call with other values is refused rather than run wrongly.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any

import torch

from ditfx.package.manifest import PackageFile, is_dtype

RETURN_DICT = "return_dict"


class CallError(TypeError):
    """A call the exported graph cannot serve: the argument, what was expected, what to do."""


def walk(value, path: tuple, leaves: dict, constants: dict) -> None:
    """Tensors of ``value`` by path into ``leaves``; every other leaf (None, numbers, strings) into ``constants``."""
    if isinstance(value, torch.Tensor):
        leaves[path] = value
    elif isinstance(value, dict):
        constants[path] = {"dict": sorted(map(str, value))}
        for k, v in value.items():
            walk(v, (*path, str(k)), leaves, constants)
    elif isinstance(value, (list, tuple)):
        constants[path] = {type(value).__name__: len(value)}
        for k, v in enumerate(value):
            walk(v, (*path, str(k)), leaves, constants)
    else:
        constants[path] = _jsonable(value)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {"repr": repr(value)}


def _key(path: tuple) -> str:
    return ".".join(path)


@dataclass
class CallSpec:
    """See the module docstring. Paths are dotted: ``added_cond_kwargs.resolution``."""

    parameters: list[str]  # the forward's parameter names in order (no self)
    defaults: dict[str, Any]  # defaults of the parameters that have one (JSON, or {"repr": ...})
    var_keyword: bool  # the forward takes **kwargs
    inputs: list[dict]  # per graph input: {"argument": path} | {"weight": key} | {"scalar": path, "dtype": ...}
    constants: dict[str, Any]  # the non-tensor arguments the graph was captured with
    tensors: dict[str, dict]  # path -> {"shape", "dtype"} of every tensor argument (graph input or not)
    output: dict  # how the result is built from the graph's flat outputs
    config: dict | None = None  # the model's config (diffusers' ``model.config``), for pipelines
    dtype: str = "float32"

    # --------------------------------------------------------------------------------- recording
    @classmethod
    def record(cls, module: torch.nn.Module, args: tuple, kwargs: dict, example_inputs: list, input_names: list,
               user_names: list[str], graph_result, user_result, dataclass_result=None) -> tuple[CallSpec, dict]:
        """The spec of this captured call, and the tensors the package must store (weights and constants)."""
        signature = inspect.signature(module.forward)
        params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        defaults = {p.name: _jsonable(p.default) for p in params if p.default is not p.empty}
        spec = cls([p.name for p in params], defaults,
                   any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()), [], {}, {}, {})
        leaves, constants = spec._flatten(spec.bind(args, kwargs))
        spec.constants = {_key(p): v for p, v in constants.items() if p[:1] != (RETURN_DICT,)}
        spec.tensors = {_key(p): {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for p, t in leaves.items()}
        by_id = {id(t): _key(p) for p, t in leaves.items()}
        names = {}
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        for name, t in named:
            names.setdefault(id(t), name)
        stored: dict[str, torch.Tensor] = {}
        for k, (x, placeholder) in enumerate(zip(example_inputs, input_names)):
            if not isinstance(x, torch.Tensor):
                raise CallError(f"graph input {placeholder} is a {type(x).__name__}, not a tensor: this graph cannot "
                                "be exported (torch.compile it with dynamic=False)")
            if id(x) in by_id:
                spec.inputs.append({"argument": by_id[id(x)]})
            elif id(x) in names:
                key = names[id(x)]
                stored[key] = x
                spec.inputs.append({"weight": key})
            elif _is_number(constants.get((user_names[k],))):  # a Python number Dynamo passes as a tensor
                spec.inputs.append({"scalar": user_names[k], "dtype": str(x.dtype).removeprefix("torch.")})
            else:  # a tensor the model made or holds outside its parameters and buffers: a constant of the graph
                key = f"__constant__.{k}"
                stored[key] = x
                spec.inputs.append({"weight": key})
        spec.output = _output_template(graph_result, user_result, dataclass_result)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "items"):
            spec.config = {k: _jsonable(v) for k, v in dict(config).items() if not str(k).startswith("_")}
        floating = [p for p in module.parameters() if p.is_floating_point()]
        spec.dtype = str(floating[0].dtype if floating else torch.float32).removeprefix("torch.")
        return spec, stored

    def _flatten(self, bound: dict) -> tuple[dict, dict]:
        leaves, constants = {}, {}
        for name, value in bound.items():
            walk(value, (name,), leaves, constants)
        return leaves, constants

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name, the defaults filled in."""
        if len(args) > len(self.parameters):
            raise CallError(f"this model takes at most {len(self.parameters)} positional arguments "
                            f"({', '.join(self.parameters)}), got {len(args)}")
        bound = dict(zip(self.parameters, args))
        for name, value in kwargs.items():
            if name in bound:
                raise CallError(f"got multiple values for argument {name!r}")
            if name not in self.parameters and not self.var_keyword:
                raise CallError(f"unexpected argument {name!r}; this model takes {', '.join(self.parameters)}")
            bound[name] = value
        for name, value in self.defaults.items():
            bound.setdefault(name, None if isinstance(value, dict) and "repr" in value else value)
        return bound

    # ------------------------------------------------------------------------------------ calling
    def graph_inputs(self, args: tuple, kwargs: dict, weights: dict[str, torch.Tensor]) -> tuple[list, bool]:
        """The graph's inputs for this call (checked), and whether it asks for a dict result."""
        bound = self.bind(args, kwargs)
        leaves, constants = self._flatten(bound)
        return_dict = constants.pop((RETURN_DICT,), self.defaults.get(RETURN_DICT, False))
        for path in [p for p in constants if p[:1] == (RETURN_DICT,)]:
            constants.pop(path)
        given = {_key(p): v for p, v in constants.items()}
        scalars = {e["scalar"] for e in self.inputs if "scalar" in e}
        for path, value in self.constants.items():
            if path in scalars and _is_number(given.get(path)):
                continue
            if given.get(path, _MISSING) != value and not (path in given and _same_repr(given[path], value)):
                got = "a tensor" if any(_key(p) == path for p in leaves) else repr(given.get(path, "nothing"))
                raise CallError(f"argument {path} was {_show(value)} when this package was exported, got {got}: the "
                                "exported graph is specialised to it; export again with this value")
        tensors = {_key(p): t for p, t in leaves.items()}
        passed = {*self.parameters[:len(args)], *kwargs}  # the others are defaults
        for path in sorted(self.tensors.keys() - tensors.keys()):  # first: a list of tensors there is not a tensor
            value = _at(bound, path) if path.split(".")[0] in passed else _MISSING
            raise CallError(_not_a_tensor(path, value, self.tensors[path]))
        for path in tensors.keys() - self.tensors.keys():
            raise CallError(f"argument {path} is a tensor, but was {_show(self.constants.get(path))} when this "
                            "package was exported: the exported graph does not read it; export again with it")
        inputs = []
        for entry in self.inputs:
            if "argument" in entry:
                inputs.append(tensors[entry["argument"]])
            elif "weight" in entry:
                inputs.append(weights[entry["weight"]])
            else:
                inputs.append(torch.tensor(given[entry["scalar"]], dtype=getattr(torch, entry["dtype"])))
        return inputs, bool(return_dict)

    def result(self, graph_result, return_dict: bool):
        """The call's result from the graph's outputs, as the model returns it."""
        flat = _tensors_of(graph_result)
        out = self.output
        values = [flat[i] for i in out["leaves"]]
        if return_dict and out.get("class"):
            module, _, name = out["class"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            return cls(**dict(zip(out["fields"], values)))
        if out["kind"] == "tensor":
            return values[0]
        return tuple(values) if out["kind"] != "list" else list(values)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CallSpec:
        return cls(**data)

    @classmethod
    def read(cls, file: PackageFile) -> CallSpec:
        """The spec of a package's ``call.json``, its shape checked (errors name the file)."""
        fields = dataclasses.fields(cls)
        data = file.object(file.read(), "the call spec", [f.name for f in fields if f.default is dataclasses.MISSING],
                           [f.name for f in fields if f.default is not dataclasses.MISSING])
        file.check(_strings(data["parameters"]) and isinstance(data["var_keyword"], bool)
                   and isinstance(data["defaults"], dict) and isinstance(data["constants"], dict),
                   "parameters must be a list of names, var_keyword true or false, defaults and constants objects")
        file.check(isinstance(data["inputs"], list) and all(map(_input_entry, data["inputs"])),
                   "inputs must be a list of {'argument'}, {'weight'} or {'scalar', 'dtype'} objects")
        tensors = data["tensors"]
        file.check(isinstance(tensors, dict) and all(_tensor_entry(t) for t in tensors.values()),
                   "tensors must map each tensor argument to its {'shape', 'dtype'}")
        output = file.object(data["output"], "output", ("leaves", "kind"), ("class", "fields"))
        file.check(isinstance(output["leaves"], list) and all(type(k) is int and k >= 0 for k in output["leaves"])
                   and output["kind"] in ("tensor", "tuple", "list") and isinstance(output.get("class", ""), str)
                   and _strings(output.get("fields", [])),
                   "output must hold leaves (indices), kind (tensor, tuple or list), and a class with its fields")
        file.check(data.get("config") is None or isinstance(data["config"], dict), "config must be an object or null")
        file.check(is_dtype(data.get("dtype", "float32")), f"dtype {data.get('dtype')!r} is not a torch dtype")
        return cls.from_json(data)


_MISSING = object()


def _at(bound: dict, path: str):
    """The value at the dotted ``path`` of the bound arguments, or _MISSING."""
    value = bound
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _not_a_tensor(path: str, value, spec: dict) -> str:
    """Why a call's value where the package was exported with a tensor is refused, and how to pass a tensor."""
    exported = f"this package was exported with a {spec['dtype']} tensor of shape {spec['shape']} there"
    if value is _MISSING:
        return f"argument {path} is missing; {exported}"
    if type(value).__name__ == "ndarray":
        hint = "convert a numpy array with torch.from_numpy(array)"
    elif isinstance(value, (int, float, list, tuple)) or type(value).__module__ == "numpy":
        hint = f"convert it with torch.tensor(value, dtype=torch.{spec['dtype']})"
    else:
        hint = "pass a torch.Tensor"
    return f"argument {path} is a {type(value).__name__}, not a torch.Tensor; {exported}: {hint}"


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _input_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    if set(entry) in ({"argument"}, {"weight"}):
        return isinstance(next(iter(entry.values())), str)
    return set(entry) == {"scalar", "dtype"} and isinstance(entry["scalar"], str) and is_dtype(entry["dtype"])


def _tensor_entry(entry) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"shape", "dtype"} and is_dtype(entry["dtype"])
            and isinstance(entry["shape"], list) and all(type(d) is int and d >= 0 for d in entry["shape"]))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_repr(a, recorded) -> bool:
    return isinstance(recorded, dict) and "repr" in recorded and repr(a) == recorded["repr"]


def _show(value) -> str:
    """A recorded constant as the user wrote it: a value, or the container it was."""
    if isinstance(value, dict) and len(value) == 1:
        (kind, what), = value.items()
        if kind == "repr":
            return what
        if kind == "dict":
            return f"a dict with keys {what}"
        return f"a {kind} of {what}"
    return repr(value)


def _tensors_of(value) -> list[torch.Tensor]:
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(value)
    return out


def _output_template(graph_result, user_result, dataclass_result) -> dict:
    """Which of the graph's flat outputs the result holds, and in what: a tensor, a tuple, or the model's output
    class (diffusers' ``Transformer2DModelOutput``), found from the user's result or an eager ``return_dict`` call."""
    index = {id(t): i for i, t in enumerate(_tensors_of(graph_result))}

    def leaves_of(result) -> list[int]:
        found = []
        for t in _tensors_of(result):
            if id(t) not in index:
                raise CallError("the model's result holds a tensor the captured graph does not return: this model "
                                "cannot be exported")
            found.append(index[id(t)])
        return found

    template: dict = {"leaves": leaves_of(user_result)}
    if isinstance(user_result, torch.Tensor):
        template["kind"] = "tensor"
    elif isinstance(user_result, (tuple, list)) and not dataclasses.is_dataclass(user_result):
        template["kind"] = type(user_result).__name__
    elif dataclasses.is_dataclass(user_result):
        template["kind"] = "tuple"
    else:
        raise CallError(f"the model returns a {type(user_result).__name__}; ditfx exports models that return tensors, "
                        "tuples or dataclasses of tensors")
    holder = user_result if dataclasses.is_dataclass(user_result) else dataclass_result
    if holder is not None and dataclasses.is_dataclass(holder):
        template["class"] = f"{type(holder).__module__}.{type(holder).__qualname__}"
        template["fields"] = [f.name for f in dataclasses.fields(holder) if getattr(holder, f.name) is not None]
    return template
