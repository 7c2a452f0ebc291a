"""Typed configuration: nested dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Conventions (after litgpt ``args.py`` and torchtune's CLI):

- A command's config is a ``@dataclass`` whose fields may be other dataclasses. Every field has a
  type annotation and, directly under it, a string literal: its docstring. ``describe`` prints
  those as the command's ``--help``; ``field_docs`` reads them from the source with ``ast``.
- Range and cross-field checks live in ``__post_init__`` and use ``check(cond, key, message)``;
  ``key`` is relative to that class (``"top_k"``), and the loader prefixes the full dotted path
  (``signals.transitions.top_k: must be >= 1, got 0``).
- ``from_dict`` is strict: unknown keys, wrong types (``1.5`` or ``true`` for an ``int``, ``3`` for
  a ``str``) and missing required keys are ``ConfigError``s that name the dotted key. Nothing is
  coerced except ``int`` -> ``float``, ``str`` -> ``Path`` and YAML lists -> ``tuple``. A ``float``
  must be finite: ``.nan``, ``.inf`` and ``-.inf`` are refused for every key.
- Overrides are YAML scalars/flow values: ``signals.top_k=32``, ``layers=[4,8]``, ``mode=auto``,
  ``path=null``. Quote a number meant as text: ``run_name='"2024"'``. An override replaces only
  the key it names; mappings merge key by key.
- ``to_dict``/``save_config`` write plain YAML in field order; ``from_dict(cls, to_dict(c)) == c``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from schemas.io import atomic_write_text

T = TypeVar("T")

__all__ = [
    "ConfigError", "check", "from_dict", "parse_overrides", "load_config", "to_dict",
    "save_config", "field_docs", "describe",
]


class ConfigError(ValueError):
    """A user-facing configuration error: ``[source: ]key: message``.

    ``key`` is the dotted path (``signals.top_k``, ``layers[2]``; empty when the error concerns the
    whole file); ``source`` is the file or override the offending value came from, when known.
    """

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        super().__init__(": ".join(p for p in (source, key, message) if p))

    def __reduce__(self):  # keep picklable (e.g. across worker processes) despite the custom init
        return (type(self), (self.key, self.message, self.source))


class _TypeMismatch(ConfigError):
    """The value has the wrong shape at this very key; lets a union try its next member."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition``; for ``__post_init__`` checks."""
    if not condition:
        raise ConfigError(key, message)


# ---------------------------------------------------------------- dict -> dataclass


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, as shown in errors and ``describe``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", repr(tp))


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _mismatch(key: str, tp: Any, value: Any) -> _TypeMismatch:
    hint = "; quote it to pass text" if tp is str and isinstance(value, (int, float)) else ""
    return _TypeMismatch(key, f"expected {_type_name(tp)}, got {_show(value)}{hint}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (Path, tuple, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise _TypeMismatch(key, f"expected a mapping for {tp.__name__}, got {_show(value)}")
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, value, key)
            except ConfigError as e:
                errors.append(e)
        # A member that matched the shape but failed deeper (or in __post_init__) says more.
        deeper = [e for e in errors if not (isinstance(e, _TypeMismatch) and e.key == key)]
        raise deeper[0] if deeper else _mismatch(key, tp, value)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if tp is bool or tp is str:
        if type(value) is tp:
            return value
        raise _mismatch(key, tp, value)
    if tp is int:  # bool is an int subclass, and 1.5 -> 1 would hide a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads .nan and .inf as floats; no setting means them, and they pass range
            # checks written as `x > 0` (inf) or reach files that refuse them (JSON, the manifest).
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {_show(value)}")
            return number
        raise _mismatch(key, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _mismatch(key, tp, value)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if (origin or tp) is list or not args or (len(args) == 2 and args[1] is Ellipsis):
            elem = args[0] if args else Any
            items = [_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:  # fixed-length tuple[X, Y]
            if len(value) != len(args):
                raise _mismatch(key, tp, value)
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        return items if (origin or tp) is list else tuple(items)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(key_tp, k, f"{key}.{k}"): _convert(val_tp, v, f"{key}.{k}")
                for k, v in value.items()}
    raise TypeError(f"{key}: unsupported config field type {tp!r}")  # a bug in the config class


def from_dict(cls: type[T], data: Mapping, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (YAML-loaded) mapping, strictly; see the module docstring.

    ``prefix`` is the dotted path of ``data`` within the whole config, used in error keys.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise _TypeMismatch(prefix, f"expected a mapping for {cls.__name__}, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean {_join(prefix, close[0])!r}? " if close else ""
            raise ConfigError(_join(prefix, str(name)),
                              f"unknown key; {hint}valid keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(prefix, name), f"required key is missing ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # from check() in __post_init__: its key is relative to cls
        raise ConfigError(_join(prefix, e.key), e.message) from e


# ---------------------------------------------------------------- overrides and files


def parse_overrides(items: Sequence[str]) -> dict:
    """``["a.b=3", "a.c=[1,2]", "x=auto"]`` -> ``{"a": {"b": 3, "c": [1, 2]}, "x": "auto"}``.

    Values go through ``yaml.safe_load``; one that is not valid YAML stays a string. An empty value
    (``a=``) is null, as in YAML. Later items win over earlier ones.
    """
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError("", f"malformed override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        for i, part in enumerate(p.strip() for p in parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError("", f"override {item!r} sets a key under {where!r}, "
                                      "which an earlier override set to a plain value")
        node[parts[-1].strip()] = value
    return out


def _deep_merge(base: Mapping, over: Mapping) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _read_yaml(path: Path) -> Mapping:
    if not path.is_file():
        raise ConfigError("", "config file not found" if not path.exists() else "not a file",
                          source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"invalid YAML{where}: {e.problem or e.context}", str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", str(path)) from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the top level must be a mapping of keys, got {type(data).__name__}",
                          str(path))
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read the YAML at ``path`` (or nothing, if None), apply ``overrides``, build ``cls``.

    Errors name the file, or the override when the offending key came from one.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    data = _deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        key = re.sub(r"\[\d+\]", "", e.key)
        source = str(path) if path is not None else None
        for item in reversed(overrides):  # the last override of a key is the one that counts
            okey = ".".join(p.strip() for p in item.partition("=")[0].split("."))
            if key == okey or key.startswith(okey + "."):
                source = f"override {item!r}"
                break
        raise ConfigError(e.key, e.message, source) from e


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict:
    """Plain dict (str for Path, list for tuple, dict for nested dataclasses) in field order."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``to_dict(cfg)`` as YAML, keys in field order; atomically (``schemas.io.atomic_write_text``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------- docs and help


@functools.cache
def _own_field_docs(cls: type) -> Mapping[str, str]:
    """Docstrings written in ``cls``'s own body (not its bases)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source: built dynamically or in a REPL; nothing to read
        return types.MappingProxyType({})
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return types.MappingProxyType(docs)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for a dataclass, from the string literal under each field (with bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``Sub`` or ``Sub | None``), if any."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    found = [m for m in members if dataclasses.is_dataclass(m) and isinstance(m, type)]
    return found[0] if len(found) == 1 else None


def _yaml_repr(value: Any) -> str:
    """A default as it would be written in YAML (``null``, ``true``), strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _describe(cls: type, prefix: str, defaults: Any, lines: list[str]) -> None:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in (f for f in dataclasses.fields(cls) if f.init):
        key, tp = _join(prefix, f.name), hints[f.name]
        if defaults is not None:
            has_default, default = True, getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            has_default, default = True, f.default
        elif f.default_factory is not dataclasses.MISSING:
            has_default, default = True, f.default_factory()
        else:
            has_default, default = False, None
        sub = _nested_dataclass(tp)
        if sub is not None and (default is None or isinstance(default, sub)):
            shown = " = null" if has_default and default is None else ""
            lines.append(f"{key}: {_type_name(tp)}{shown}")
        else:
            shown = f" = {_yaml_repr(_plain(default))}" if has_default else " (required)"
            lines.append(f"{key}: {_type_name(tp)}{shown}")
            sub = None
        if f.name in docs:
            lines.extend(f"    {line}".rstrip() for line in docs[f.name].splitlines())
        if sub is not None:
            _describe(sub, key, default, lines)


def describe(cls: type) -> str:
    """Help text: every dotted key with its type, default and docstring, nested keys included."""
    lines: list[str] = []
    _describe(cls, "", None, lines)
    return "\n".join(lines)
