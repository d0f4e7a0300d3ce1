"""YAML/JSON -> frozen dataclasses, with strict keys and typed ``--set dotted.key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from outlierkit.errors import ConfigError

C = TypeVar("C")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; errors name the file and say what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML or JSON file")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"cannot parse {p}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping (key: value), not {type(data).__name__}")
    return data


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested), tuples and paths -> plain JSON-ready Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (builtins, Literal, X | None, list/tuple, dict, dataclasses)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolved forward references
        return {f.name: f.type for f in dataclasses.fields(cls)}


def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "config") -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys are errors listing the valid keys."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}"
        )
    hints = _hints(cls)
    kwargs = {k: coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); values are parsed as YAML scalars (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. --set alpha=0.8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(obj: C, overrides: typing.Sequence[str]) -> C:
    """Return a copy of dataclass ``obj`` with dotted ``key=value`` overrides applied, type-checked."""
    for text in overrides:
        path, value = parse_override(text)
        obj = _set_path(obj, path, value, ".".join(path))
    return obj


def _set_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"override {full!r}: {type(obj).__name__} has no keys")
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        raise ConfigError(f"unknown override key {full!r}; valid keys here: {names}")
    hints = _hints(type(obj))
    if len(path) == 1:
        new = coerce(value, hints.get(head, Any), full)
    else:
        new = _set_path(getattr(obj, head), path[1:], value, full)
    return dataclasses.replace(obj, **{head: new})  # type: ignore[type-var]
