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


_NONE = {"", "null", "none", "~"}


def coerce(value: Any, tp: Any) -> Any:
    """Read a string the way a person writes it, as the field's type asks; other values pass through.

    YAML 1.1 (PyYAML) reads `1e-3` as a string and `no` as a boolean; a config field's
    type decides instead: `1e-3` for a float field is 0.001, `no` for a str field stays
    "no", `none`/`null` for an optional field is None. A string that fits no member of
    the type is returned unchanged, so the type check names it.
    """
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if isinstance(value, dict):  # a mapping's values, e.g. `learning_rate: {spp: 1e-2}`
        kinds = [typing.get_args(m) for m in members if typing.get_origin(m) is dict]
        return {k: coerce(v, kinds[0][1]) for k, v in value.items()} if kinds and len(kinds[0]) == 2 else value
    if not isinstance(value, str):
        return value
    if str in members or any(typing.get_origin(m) is Literal and value in typing.get_args(m) for m in members):
        return value
    text = value.strip()
    for member in members:  # the order of the annotation: int before float in `int | float`
        if member is type(None) and text.lower() in _NONE:
            return None
        if member is bool and text.lower() in ("true", "false"):  # not yes/no/on/off: one spelling, no surprises
            return text.lower() == "true"
        if member in (int, float):
            try:
                return member(text)
            except ValueError:
                continue
        if typing.get_origin(member) in (list, tuple) and text:
            (item,) = typing.get_args(member)[:1] or (Any,)
            inner = text[1:-1] if text[0] + text[-1] == "[]" else text
            return [coerce(part.strip().strip("'\""), item) for part in inner.split(",") if part.strip()]
    return value


def merge_into(cls, layers: list[tuple[str, dict]]):
    """Build `cls` from layered dicts, later layers winning; each layer is (where it came from, values).

    Raises:
        SppError: an unknown key (with the nearest valid one), a value of the wrong type, or a required field no
            layer gives (named with the first layer's source).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise SppError(f"unknown key {key!r} in {source}{nearest(key, names)}")
            value = coerce(value, hints[key])
            if value is not None or _type_ok(None, hints[key]):
                if not _type_ok(value, hints[key]):
                    raise SppError(f"{source}: {key}={value!r} should be {_describe(hints[key])}")
                values[key] = float(value) if hints[key] is float and isinstance(value, int) else value
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = layers[0][0] if layers else cls.__name__
        raise SppError(f"{where}: {missing[0]} is required but not given" + (f" (nor {', '.join(missing[1:])})"
                                                                              if missing[1:] else ""))
    return cls(**values)


def field_defaults(config) -> dict[str, Any]:
    """Each field's default (fields without one left out) of a config dataclass or instance: the value a setting
    added to spp after a run started had in that run, which `--resume` and `spp run`'s up-to-date check assume."""
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
