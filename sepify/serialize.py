"""JSON for every report: one encoder for numpy values and enums, and ``from_dict`` for dataclasses.

Every report's ``to_dict()`` carries ``schema_version`` (:data:`SCHEMA_VERSION`): a consumer can
tell which layout it reads.  ``from_dict(cls, data)`` rebuilds a dataclass (nested dataclasses,
lists and optionals of them included) from what ``to_dict`` wrote, ignoring keys it does not know
— so an edited plan round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import typing
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2


def json_default(o: Any):
    """``json.dumps(default=…)`` for what the standard encoder refuses: numpy scalars and arrays,
    enums, paths."""
    item = getattr(o, "item", None)
    if callable(item) and getattr(o, "shape", None) == ():
        return o.item()
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        return o.tolist()
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def dumps(data: Any, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, default=json_default)


def finite_or_text(v: float | None) -> float | str | None:
    """A float for JSON where infinities must survive strict parsers: ``"inf"`` / ``"-inf"`` / ``"nan"``."""
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _convert(tp, value):
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin in (list, tuple) and args:
        inner = args[0]
        items = [_convert(inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, str):
        return float(value)
    return value


def from_dict(cls, data: dict[str, Any]):
    """``cls(**data)`` with nested dataclasses rebuilt from their dicts; unknown keys are ignored."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in data:
            kwargs[f.name] = _convert(hints.get(f.name, Any), data[f.name])
    return cls(**kwargs)


__all__ = ["SCHEMA_VERSION", "dumps", "finite_or_text", "from_dict", "json_default"]
