"""Input validation: argument checks shared by the config dataclasses and the calibration files, and the
checked readers of ditfx's JSON files. (The checks of a configuration against the model it is applied to live
with each technique: ``check_model`` in ``ditfx/<technique>/config.py``.)

Every check raises at construction or load, before anything is compiled or run: a ``TypeError`` when a value
has the wrong type, a ``ValueError`` when it is out of range, each naming the class and field (and the file,
for calibration files) and saying what to pass instead.

This module imports nothing of ditfx, so every other module can use its helpers.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class WrongType(TypeError, ValueError):
    """A value of the wrong type. A TypeError, and a ValueError too, so that callers which report bad
    configuration by catching ValueError (the CLI) report these the same way."""


def same_value(a: Any, b: Any) -> bool:
    """Equality that also holds for tensors and the dicts and lists that carry them (``==`` on two tensors gives a
    tensor, which ``bool()`` refuses): same type, shape, dtype and values."""
    if hasattr(a, "dtype") and hasattr(a, "shape") and hasattr(a, "equal"):
        return type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype and bool(a.cpu().equal(b.cpu()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return bool(a == b)


def same_fields(a: Any, b: Any) -> bool:
    """Dataclass equality by :func:`same_value` on every compared field (for dataclasses that hold tensors)."""
    import dataclasses

    if type(a) is not type(b):
        return NotImplemented
    return all(same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.compare)


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a checked (normalised) value on a frozen dataclass, in its ``__post_init__``."""
    object.__setattr__(obj, name, value)


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float (numpy scalars included), not a bool, not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, *, none_ok: bool = False,
              hint: str = "") -> int | None:
    """``value`` as an int: a real integer (not a bool, not a float such as 2.0), at least ``minimum``.

    ``hint`` follows the range in the message, e.g. ``" (block first-1 is the probe)"``."""
    if value is None and none_ok:
        return None
    if not is_int(value):
        example = int(value) if is_number(value) and math.isfinite(value) else max(minimum or 0, 1)
        raise WrongType(f"{owner}.{name} must be an int{' or None' if none_ok else ''}, got {_got(value)}: "
                        f"pass a whole number such as {example}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}{hint}, got {value}")
    return int(value)


def check_float(owner: str, name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                below_maximum: bool = False, none_ok: bool = False, hint: str = "") -> float | None:
    """``value`` as a float: an int or a float (not a bool, not a string), finite, in
    [``minimum``, ``maximum``] (``below_maximum``: [minimum, maximum))."""
    if value is None and none_ok:
        return None
    if not is_number(value):
        raise WrongType(f"{owner}.{name} must be a number (int or float){' or None' if none_ok else ''}, "
                        f"got {_got(value)}: {_number_hint(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value}")
    if minimum is not None and maximum is not None and (value < minimum or value > maximum
                                                        or (below_maximum and value == maximum)):
        interval = f"[{minimum:g}, {maximum:g}{')' if below_maximum else ']'}"
        raise ValueError(f"{owner}.{name} must be in {interval}{hint}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum:g}{hint}, got {value}")
    if maximum is not None and (value > maximum or (below_maximum and value == maximum)):
        raise ValueError(f"{owner}.{name} must be {'<' if below_maximum else '<='} {maximum:g}{hint}, got {value}")
    return value


def _number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            return f"pass the number {float(value)!r}, not the string {value!r}"
        except ValueError:
            return "pass an int or a float, not a string"
    if isinstance(value, bool):
        return "pass a number such as 0.1, not True or False"
    return "pass an int or a float"


def check_bool(owner: str, name: str, value: Any, *, none_ok: bool = False, hint: str = "") -> bool | None:
    """``value`` is True or False (or None when ``none_ok``); 1, 0 and strings such as "no" are refused."""
    if value is None and none_ok:
        return None
    if not isinstance(value, bool):
        raise WrongType(f"{owner}.{name} must be True or False{' or None' if none_ok else ''}{hint}, "
                        f"got {_got(value)}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any], message: str | None = None) -> Any:
    """``value`` is one of ``choices``; ``message`` (default: the choices) replaces the whole error text."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(message or f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, "
                                    f"got {value!r}")
    return value


def check_list(owner: str, name: str, value: Any, *, what: str = "list") -> list:
    """``value`` is a list or a tuple (a string, a dict or a tensor is refused); returns a list."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise WrongType(f"{owner}.{name} must be a {what}, got {type(value).__name__}: {_short(value)}")
    return list(value)


def check_floats(owner: str, name: str, value: Any, minimum: float | None = None) -> list[float]:
    """A list of finite numbers (at least ``minimum``); the message names the first bad entry's index."""
    items = check_list(owner, name, value, what="list of numbers")
    out = []
    for i, v in enumerate(items):
        out.append(check_float(owner, f"{name}[{i}]", v, minimum))
    return out


def check_strictly_decreasing(owner: str, name: str, values: list[float]) -> None:
    for i in range(1, len(values)):
        if not values[i] < values[i - 1]:
            raise ValueError(f"{owner}.{name} must be strictly decreasing (a generation's timesteps decrease), "
                             f"but {name}[{i}] = {values[i]} follows {name}[{i - 1}] = {values[i - 1]}")


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


# ------------------------------------------------------------------------------------------- JSON files


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json_file(path: str | Path, kind: str, fmt: str, remedy: str, redo: str | None = None,
                   missing: type[Exception] = FileNotFoundError) -> dict:
    """The JSON object of a ditfx file of format ``fmt``, without its "format" key.

    Every failure names ``path`` and says what to do: ``remedy`` for a missing file (``missing`` is raised, e.g.
    "write one with 'ditfx calibrate'"), ``redo`` (default: ``remedy``) for a damaged one: unreadable text,
    broken JSON (line and column), not a JSON object, another format, a directory (ValueError)."""
    path = Path(path)
    redo = redo or remedy
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a {kind} file: pass the path of the JSON file")
    if not path.is_file():
        raise missing(f"{kind} {path} not found: {remedy}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a {kind} (not UTF-8 text: {e.reason} at byte {e.start}): {redo}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the {kind} is "
                         f"damaged or truncated: {redo}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a {kind}: expected a JSON object with \"format\": \"{fmt}\", got a "
                         f"JSON {_JSON_TYPES.get(type(data), type(data).__name__)}: {redo}")
    found = data.pop("format", None)
    if found != fmt:
        if isinstance(found, str) and found.split("/")[0] == fmt.split("/")[0]:
            raise ValueError(f"{path} is a {kind} in format {found!r}, which this ditfx does not read (it reads "
                             f"{fmt!r}): {redo}, or update ditfx")
        raise ValueError(f"{path} is not a {kind} (its \"format\" is {found!r}, expected {fmt!r}): {redo}")
    return data


def write_json_file(path: str | Path, fmt: str, data: dict) -> Path:
    """Write ``data`` as a ditfx JSON file of format ``fmt`` (the reverse of :func:`read_json_file`), its folder
    made; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": fmt, **data}, indent=1))
    return path


def check_fields(source: str, kind: str, data: dict, cls: type, remedy: str) -> None:
    """``data``'s keys are fields of the dataclass ``cls`` and include every field without a default."""
    import dataclasses

    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} in a {kind}; known: {known}: {remedy}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{source}: the {kind} has no {missing} field(s) (required: {required}): {remedy}")


def build_from_file(source: str | Path, kind: str, cls: type, data: dict, remedy: str):
    """``cls(**data)`` with the file named in any error (same exception type) and the remedy appended."""
    check_fields(str(source), kind, data, cls, remedy)
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{source}: {e}; {remedy}") from None
