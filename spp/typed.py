"""Build a typed config dataclass from layered dicts, checking every key and value.

Shared by `spp.config` (the stages' configs) and `spp.adapter.config` (`adapter_config.json`),
so neither imports the other for it. Precedence is the order of the layers: later wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from spp.errors import SppError


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, Path))
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' if none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def merge_into(cls, layers: list[tuple[str, dict]]):
    """Build `cls` from layered dicts, later layers winning; each layer is (where it came from, values).

    Raises:
        SppError: an unknown key (with the nearest valid one) or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise SppError(f"unknown key {key!r} in {source}{nearest(key, names)}")
            if value is not None or _type_ok(None, hints[key]):
                if not _type_ok(value, hints[key]):
                    raise SppError(f"{source}: {key}={value!r} should be {_describe(hints[key])}")
                values[key] = float(value) if hints[key] is float and isinstance(value, int) else value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field nobody supplied
        raise SppError(f"{cls.__name__}: {exc}") from exc
