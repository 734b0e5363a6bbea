"""Typed dataclasses from YAML: field helpers, and a loader that checks every key, type and value.

Generic: nothing here knows halokit's schema (that is :mod:`halokit.config`). A field's metadata holds a
one-line ``doc``, and where the type alone is not enough, ``expect`` (what a valid value looks like, for
the message) and ``valid`` (a predicate). :func:`build` raises ConfigError naming the dotted key, the bad
value and what is allowed, e.g. ``train.lr: expected a positive float, got "fast"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from halokit.errors import ConfigError


def opt(default: Any = None, doc: str = "", *, expect: str | None = None,
         valid: Callable[[Any], bool] | None = None, factory: Callable[[], Any] | None = None) -> Any:
    meta = {"doc": doc, "expect": expect, "valid": valid}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def positive(doc: str, default: float) -> Any:
    return opt(default, doc, expect="a positive float", valid=lambda v: v > 0)


def count(doc: str, default: int, minimum: int = 1) -> Any:
    word = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    return opt(default, doc, expect=word, valid=lambda v: v >= minimum)


def fraction(doc: str, default: float, *, closed_top: bool = True) -> Any:
    if closed_top:
        return opt(default, doc, expect="a float in [0, 1]", valid=lambda v: 0.0 <= v <= 1.0)
    return opt(default, doc, expect="a float in [0, 1)", valid=lambda v: 0.0 <= v < 1.0)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping with ``yaml.safe_load``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_show(values)}")
    return values


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-5"`` -> ``("train.lr", 1e-05)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set ``values[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


T = typing.TypeVar("T")


def build(cls: type[T], values: Any, prefix: str = "") -> T:
    """Construct dataclass ``cls`` from a mapping, checking every key, type and constraint."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_show(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"allowed: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}")
    kwargs = {name: _coerce(value, hints[name], fields[name], prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default; none exist today, keep the message clear
        raise ConfigError(f"{where}: {err}") from err


def _coerce(value: Any, tp: Any, fld: dataclasses.Field | None, key: str) -> Any:
    meta = fld.metadata if fld is not None else {}
    result = _convert(value, tp, key, meta.get("expect"))
    valid = meta.get("valid")
    if valid is not None and result is not None and not valid(result):
        raise ConfigError(f"{key}: expected {meta['expect']}, got {_show(value)}")
    return result


def _convert(value: Any, tp: Any, key: str, expect: str | None) -> Any:
    def fail(what: str) -> ConfigError:
        return ConfigError(f"{key}: expected {expect or what}, got {_show(value)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(value, inner[0], key, expect)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads "5e-6" as a string
            except ValueError:
                pass
        if number is None or not math.isfinite(number):  # inf and nan poison every later computation
            raise fail("a finite float")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if origin is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        return [_convert(v, args[0], f"{key}[{i}]", None) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]", None) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        return {str(k): _convert(v, args[1], f"{key}.{k}", None) for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in the schema, not user input


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists) for YAML/JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every config key as ``(dotted key, default, doc)``, for ``halokit train --keys``."""
    rows: list[tuple[str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, default, f.metadata.get("doc", "")))
    return rows

