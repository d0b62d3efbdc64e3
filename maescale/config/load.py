"""Reading configs: YAML files with ``base:`` inheritance, dotted ``key=value`` overrides, and the
typed build of a :class:`~maescale.config.schema.Config` from a mapping (types checked here,
values in :mod:`maescale.config.validate`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from maescale.config.schema import Config, ConfigError
from maescale.config.validate import validate

log = logging.getLogger("maescale.config")

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``base:`` chains), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = load_yaml_with_bases(path) if path is not None else {}
    apply_overrides(raw, overrides)
    return config_from_dict(raw)


# Pairs of keys of which a run sets exactly one: an override of one replaces the other's value
# from the config files (``configs/vit_huge.yaml train.max_steps=100`` is a smoke test of a recipe
# that sets ``train.epochs``).
_EITHER_OR = (("train.max_steps", "train.epochs"),)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply dotted ``key=value`` overrides to a raw config mapping, in order.

    An override of one key of an either-or pair (``train.max_steps`` / ``train.epochs``) clears
    the other when the overrides do not set it too (logged); both set together stays an error.
    """
    given = {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        given[key] = value
    for pair in _EITHER_OR:
        for key, other in (pair, pair[::-1]):
            if given.get(key) is not None and other not in given and _get_dotted(raw, other) is not None:
                log.warning("%s=%s given: dropping %s=%s of the config file (set exactly one of the two)",
                            key, given[key], other, _get_dotted(raw, other))
                set_dotted(raw, other, None)


def _get_dotted(raw: Mapping[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping."""
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def load_yaml_with_bases(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and merge it over its ``base:`` file(s), resolved relative to it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"'base:' inheritance loops: {chain}", key="base")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"in '{path}': expected a file name or list of file names, got {bases!r}", key="base")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        merged = deep_merge(merged, load_yaml_with_bases(base_path, (*_seen, resolved)))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win, nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.max_steps=100"`` -> ``("train.max_steps", 100)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override '{item}': '{key}' is not a dotted key such as train.max_steps")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string, type checking decides
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for key ``"a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section", key=key)
        node = nxt
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------
# Typed construction
# --------------------------------------------------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a section (mapping), got {raw!r}", key=prefix.rstrip(".") or None)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key; allowed keys here are: {allowed}", key=key)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} " + "/".join(sorted({_type_name(a) for a in args}))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow only lossless conversions."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"got {value!r} ({type(value).__name__}); expected {_type_name(tp)}", key=key)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"got {value!r}; expected a finite number", key=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        # bool before str so that `resume: true` is a bool, not a path
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"got {value!r}; expected a finite number", key=key)
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return copy.deepcopy(dict(value))
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module
