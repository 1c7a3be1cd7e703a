"""Typed configs for every stage, and how YAML files and command-line overrides become one.

Precedence: dataclass defaults < YAML file < explicit flags < `--set key=value`.
Every key must name a field; an unknown key is an error naming the nearest valid
one. `--set` values are parsed as YAML scalars and checked against the field's
type. Each dataclass checks its own ranges in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

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


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a=1", "b=x"]` -> `{"a": 1, "b": "x"}`, each value parsed as a YAML scalar."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SppError(f"--set {item!r} must look like key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise SppError(f"--set {item!r}: the value is not valid YAML") from exc
    return out


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, turning a missing or malformed file into an SppError that names it."""
    path = Path(path)
    if not path.is_file():
        raise SppError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SppError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SppError(f"config {path} must be a YAML mapping of key: value")
    return data


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
                values[key] = int(value) if hints[key] is float and isinstance(value, int) else value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field nobody supplied
        raise SppError(f"{cls.__name__}: {exc}") from exc


def to_dict(cfg) -> dict:
    """A config as plain JSON/YAML-friendly values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def write_yaml(path: Path, cfg) -> None:
    """Write the resolved config, so an output records exactly what made it."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise SppError(f"{name}={value} is out of range {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}")


# --------------------------------------------------------------------------- prune


@dataclass
class PruneConfig:
    """Settings of `spp prune`. `pattern` is `unstructured` or `N:M` (at most N kept in every M inputs)."""

    model: str
    output: str
    method: Literal["wanda", "sparsegpt", "magnitude"] = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None  # default 0.5 for unstructured; implied 1 - N/M for N:M
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None  # default min(2048, the model's context)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    overwrite: bool = False
    resume: bool = False
    offload_activations: bool = False  # keep calibration activations on the CPU between blocks
    blocksize: int = 128  # SparseGPT column block width
    percdamp: float = 0.01  # SparseGPT dampening, as a fraction of the mean Hessian diagonal

    def __post_init__(self):
        from spp.prune.masks import parse_pattern

        n_m = parse_pattern(self.pattern)
        if self.sparsity is not None:
            _check_range("--sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        if n_m is None:
            if self.sparsity is None:
                self.sparsity = 0.5
        else:
            implied = 1 - n_m[0] / n_m[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise SppError(
                    f"--sparsity {self.sparsity} contradicts --pattern {self.pattern} "
                    f"(which means sparsity {implied:g}); drop --sparsity for N:M patterns"
                )
            self.sparsity = implied
        _check_range("--nsamples", self.nsamples, 1)
        if self.seqlen is not None:
            _check_range("--seqlen", self.seqlen, 1)
        _check_range("--blocksize", self.blocksize, 1)
        _check_range("--percdamp", self.percdamp, 0.0, lo_open=True)
