"""Typed dataclass configs <-> TOML files <-> command-line overrides, for any nested dataclass.

A recipe is a small TOML file whose tables mirror the dataclass fields; every field can then be overridden
from the command line with a dotted flag (`--optim.lr 5e-4`, `--data.workers=2`). Values are converted to
the field's annotated type, so a typo or a bad value is an error that names the field, never a silent
string where a number belongs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's fields or types."""


def invalid(field: str, value: Any, problem: str) -> ConfigError:
    """The one error format for a bad value: `optim.lr = inf: must be a finite number > 0`."""
    return ConfigError(f"{field} = {value!r}: {problem}")


def require(ok: bool, field: str, value: Any, problem: str) -> None:
    """Raise `invalid(field, value, problem)` unless `ok`: one line per check in a `__post_init__`."""
    if not ok:
        raise invalid(field, value, problem)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML or command-line value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            with contextlib.suppress(ConfigError):
                return _convert(value, option, where)
        raise invalid(where, value, f"fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise invalid(where, value, "expected a table")
        return from_dict(tp, value, where)
    if origin is tuple:
        items = _split_list(value, where)
        args = typing.get_args(tp)
        item_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(items):
            raise invalid(where, value, f"expected {len(item_types)} values")
        return tuple(
            _convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(items, item_types, strict=True))
        )
    if origin is list:
        (item_type,) = typing.get_args(tp)
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(_split_list(value, where))]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise invalid(where, value, f"not one of {', '.join(map(repr, choices))}")
        return value
    return _convert_scalar(value, tp, where)


def _split_list(value: Any, where: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise invalid(where, value, f"not a JSON list ({e})") from None
        return [v.strip() for v in text.split(",") if v.strip()]
    return [value]


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise invalid(where, value, "expected true/false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise invalid(where, value, f"expected {tp.__name__}")
        try:
            converted = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise invalid(where, value, f"expected {tp.__name__}") from None
        if tp is int and isinstance(value, float) and converted != value:
            raise invalid(where, value, "expected int")
        return converted
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise invalid(where, value, "expected a string")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors, missing ones take defaults."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field(s) {', '.join(prefix + k for k in sorted(unknown))}")
    kwargs = {k: _convert(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_toml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise ConfigError(f"config file {problem}: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return from_dict(cls, data)


def apply_overrides(config: T, args: list[str]) -> T:
    """Apply `--a.b value` / `--a.b=value` flags to a (nested) dataclass, returning a new config."""
    data = to_dict(config)
    for key, value in _parse_flags(args):
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown option --{key}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown option --{key}")
        node[parts[-1]] = value
    return from_dict(type(config), data)


def _parse_flags(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an option like --optim.lr 5e-4, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:  # a bare flag switches a boolean on
            key, value = arg[2:], "true"
            i += 1
        pairs.append((key, value))
    return pairs


def dump_toml(config: Any) -> str:
    """The resolved config as TOML, written beside every run (top-level scalars, then one table each)."""
    lines: list[str] = []
    _dump_table(to_dict(config), [], lines)
    return "\n".join(lines).strip() + "\n"


def toml_value(value: Any) -> str:
    # JSON spells most TOML values the same way; not infinities and NaN (e.g. an unclamped scale).
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _dump_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if path:
        lines.append(f"\n[{'.'.join(path)}]")
    for k, v in scalars.items():
        if v is None:
            lines.append(f"# {k} = (unset)")
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            _dump_table(v, [*path, k], lines)
