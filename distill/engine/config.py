"""Typed configs from YAML: nested dataclasses, validated before any work starts (STYLE.md 6).

A field may declare ``metadata={"choices": (...)}`` or ``metadata={"min": v}``. ``from_dict`` rejects
unknown keys and wrong types with one sentence that names the dotted key and the allowed values;
``to_dict`` gives plain data for ``config.yaml``. ``--set a.b=value`` overrides reach nested keys.
YAML 1.1 reads exponent literals without a dot or an exponent sign (``1e-4``, ``1e30``, ``5E-3``) as strings:
a float field takes such a string as the float it spells; a string field keeps it as it is.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


class LaunchError(ConfigError):
    """A launch that cannot run, met alike by every rank before they connect: rank 0 says it, once."""


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key!r} conflicts with another override of {part!r}")
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: ``over`` wins; nested dicts are merged, not replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, got {type(raw).__name__}")
    return raw or {}


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'<problem> at line L, column C' from a PyYAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _takes_float_not_str(tp) -> bool:
    """Whether a field of type ``tp`` accepts a float but not a string (float, float | None, ...)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return float in args and str not in args and Any not in args


def _float_literal(value: Any, tp) -> Any:
    """``value`` as a float when it is a string spelling a number and the field takes a float, not a string."""
    if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()) and _takes_float_not_str(tp):
        return float(value)
    return value


def _type_ok(value: Any, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


def _dataclass_arg(tp):
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls, raw: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from plain data, checking keys, types, choices and minima."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown config key(s) {names}; allowed under {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        key, tp = prefix + name, hints[name]
        value = _float_literal(value, tp)
        sub = _dataclass_arg(tp)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, key + ".")
        elif not _type_ok(value, tp):
            raise ConfigError(f"config key {key!r} must be of type {_type_name(tp)}, got {value!r}")
        elif isinstance(tp, type) and tp is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    cfg = cls(**kwargs)
    check_values(cfg, prefix)
    return cfg


def check_values(cfg, prefix: str = "") -> None:
    """Check every field's ``choices`` and ``min`` metadata (also on defaults)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join("null" if c is None else str(c) for c in f.metadata["choices"])
            raise ConfigError(f"config key {key!r} is {value!r}; allowed: {allowed}")
        if isinstance(value, float) and math.isnan(value):  # nan passes every comparison: named here, not by the optimizer
            bounds = " and ".join(f"{op} {f.metadata[k]}" for k, op in (("min", ">="), ("max", "<=")) if k in f.metadata)
            raise ConfigError(f"config key {key!r} is nan; allowed: a number{' ' + bounds if bounds else ''}")
        if "min" in f.metadata and value is not None and value < f.metadata["min"]:
            raise ConfigError(f"config key {key!r} must be at least {f.metadata['min']}, got {value!r}")
        if "max" in f.metadata and value is not None and value > f.metadata["max"]:
            raise ConfigError(f"config key {key!r} must be at most {f.metadata['max']}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def choice(default, choices, **kw):
    """A field restricted to ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)}, **kw)


def at_least(default, minimum, maximum=None):
    meta = {"min": minimum} if maximum is None else {"min": minimum, "max": maximum}
    return dataclasses.field(default=default, metadata=meta)
