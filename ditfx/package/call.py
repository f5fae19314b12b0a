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

RETURN_DICT = "return_dict"


class CallError(TypeError):
    """A call the exported graph cannot serve: the argument, what was expected, what to do."""


def _walk(value, path: tuple, leaves: dict, constants: dict) -> None:
    """Tensors of ``value`` by path into ``leaves``; every other leaf (None, numbers, strings) into ``constants``."""
    if isinstance(value, torch.Tensor):
        leaves[path] = value
    elif isinstance(value, dict):
        constants[path] = {"dict": sorted(map(str, value))}
        for k, v in value.items():
            _walk(v, (*path, str(k)), leaves, constants)
    elif isinstance(value, (list, tuple)):
        constants[path] = {type(value).__name__: len(value)}
        for k, v in enumerate(value):
            _walk(v, (*path, str(k)), leaves, constants)
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
        leaves, constants = spec._flatten(args, kwargs)
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

    def _flatten(self, args: tuple, kwargs: dict) -> tuple[dict, dict]:
        bound = self.bind(args, kwargs)
        leaves, constants = {}, {}
        for name, value in bound.items():
            _walk(value, (name,), leaves, constants)
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
        leaves, constants = self._flatten(args, kwargs)
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
        for path in tensors.keys() - self.tensors.keys():
            raise CallError(f"argument {path} is a tensor, but was {_show(self.constants.get(path))} when this "
                            "package was exported: the exported graph does not read it; export again with it")
        for path in self.tensors.keys() - tensors.keys():
            raise CallError(f"argument {path} is missing; this package was exported with a tensor there")
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


_MISSING = object()


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
