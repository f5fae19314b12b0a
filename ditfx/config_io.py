"""Configs on disk: a technique config as JSON (its schedule, coefficient, adapter or tensor fields in files beside
it), and a whole :class:`~ditfx.config.Config` as a versioned JSON file (``Config.save`` / ``Config.load``).

A field holding an object with ``save`` (a cache schedule, LinearAG coefficients, a budget adapter) is written to
its own file, named from the JSON's name, and the JSON refers to it by relative name; a dict of tensors (step
heads) goes to a safetensors file. Loading reads them back, so a saved config travels as one folder.

The codec knows no technique (torchao's ``config_to_dict`` / ``config_from_dict`` manner): a technique config is
written under its class name, and read back among the classes that the :class:`~ditfx.config.Config` class given
to the reader registers (its technique fields).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditfx.validation import read_json_file

FORMAT = "ditfx.config/1"
_PLAIN = ("compiler", "compile_regions", "kernels")


def config_classes(config_class: type) -> dict[str, type]:
    """Technique config classes by name: those the techniques of ``config_class`` take."""
    return {cls.__name__: cls for t in config_class.registered() for cls in t.configs + t.internal}


def _field_to_json(value, directory: Path, stem: str):
    if hasattr(value, "save"):  # a schedule, coefficient or adapter file travels beside the JSON
        name = f"{stem}{getattr(value, 'FILE_SUFFIX', '.json')}"
        value.save(directory / name)
        return {"file": name}
    if isinstance(value, (list, tuple)) and any(hasattr(v, "save") for v in value):  # several adapters
        return [_field_to_json(v, directory, f"{stem}{i}") for i, v in enumerate(value)]
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        name = f"{stem}.safetensors"  # tensors (step heads) travel beside the JSON
        save_file({key: t.detach().contiguous().cpu() for key, t in value.items()}, str(directory / name))
        return {"tensors": name}
    return list(value) if isinstance(value, tuple) else value


def technique_to_json(cfg, directory: Path, stem: str) -> dict:
    """``{"type": class name, "fields": {...}}``; file-backed fields are written as ``<stem>.<field>...``."""
    fields = {f.name: _field_to_json(getattr(cfg, f.name), directory, f"{stem}.{f.name}")
              for f in dataclasses.fields(cfg)}
    return {"type": type(cfg).__name__, "fields": fields}


def _field_from_json(value, directory: Path):
    if isinstance(value, dict) and set(value) == {"file"}:
        return str(directory / value["file"])
    if isinstance(value, dict) and set(value) == {"tensors"}:
        return load_file(str(directory / value["tensors"]))
    if isinstance(value, list) and value and all(isinstance(v, dict) and set(v) == {"file"} for v in value):
        return [str(directory / v["file"]) for v in value]
    return value


def technique_from_json(data: dict, directory: Path, source: Path, classes: dict[str, type]):
    """The technique config of :func:`technique_to_json`'s ``data``, one of ``classes`` (by name:
    :func:`config_classes`); ``source`` names the file in errors."""
    cls = classes.get(data.get("type")) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"{source}: unknown technique config {data!r}; known: {sorted(classes)}")
    known = {f.name for f in dataclasses.fields(cls)}
    fields = data.get("fields", {})
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: {cls.__name__} has no field(s) {unknown} (written by a newer ditfx?)")
    return cls(**{k: _field_from_json(v, directory) for k, v in fields.items()})


def save_config(config, path) -> Path:
    """Write ``config`` (a :class:`~ditfx.config.Config`) as versioned JSON at ``path`` (with its files beside
    it); the tuning record goes along."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"a config is saved as JSON: give a path ending in .json, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, **{k: getattr(config, k) for k in _PLAIN}}
    for technique in config.registered():
        value = getattr(config, technique.name)
        data[technique.name] = (None if value is None
                                else technique_to_json(value, path.parent, f"{path.stem}.{technique.name}"))
    if config.tuning is not None:
        data["tuning"] = config.tuning
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_config(path, config_class: type):
    """Read a config of ``config_class`` (:class:`~ditfx.config.Config`) written by :func:`save_config`
    (``Config.save``, ``ditfx.tune``); errors name the file."""
    path = Path(path)
    data = read_json_file(path, "ditfx config", FORMAT, "write one with Config.save or ditfx.tune")
    slots = [t.name for t in config_class.registered()]
    unknown = sorted(set(data) - {"tuning", *_PLAIN, *slots})
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}")
    fields = {k: data[k] for k in _PLAIN if k in data}
    classes = config_classes(config_class)
    for slot in slots:
        if data.get(slot) is not None:
            fields[slot] = technique_from_json(data[slot], path.parent, path, classes)
    return config_class(**fields, tuning=data.get("tuning"))
