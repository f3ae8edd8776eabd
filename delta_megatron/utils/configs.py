"""Typed dataclass configs: strict loading, dotted overrides, validation that names the field.

Every component owns a ``@dataclass`` config next to its code (torchtitan style). This module is the
machinery they share: building a config from a nested dict (YAML), type coercion driven by the
annotations, rejecting unknown keys, dotted command-line overrides (``algo.loss.name=sapo``) and error
messages of the form ``credit.delta.lambda_range: (1.2, 0.8) — lower bound must be < upper bound``.

A config class may define ``validate(self) -> None`` and raise :class:`ConfigError` via :func:`fail`;
:func:`validate` walks the tree and prefixes the field path. Fields declared with :func:`option` carry
their one-line meaning and allowed range in the dataclass itself (one source for validation and for
``config explain``); every float field must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong. The message names the field path, the value and what is allowed."""

    def __init__(self, path: str, value: Any, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{path or '<root>'}: {value!r} — {allowed}")


class _FieldFailure(Exception):
    """Raised by ``fail`` inside a ``validate`` hook; re-raised as ConfigError with the full path."""

    def __init__(self, field: str, value: Any, allowed: str):
        super().__init__(field)
        self.field, self.value, self.allowed = field, value, allowed


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
    """Reject ``field`` (relative to the config being validated) with a message saying what is allowed."""
    raise _FieldFailure(field, value, allowed)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A numeric field's allowed range (``None`` = unbounded on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, value: float) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def describe(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else "(-inf"
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"


def option(default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A config field with its meaning and allowed range, e.g.
    ``lr: float = option(5e-4, "peak learning rate", gt=0)``; :func:`validate` enforces the range
    (``None`` passes for optional fields) and ``config explain`` prints both."""
    bounds = Bounds(ge, gt, le, lt) if any(b is not None for b in (ge, gt, le, lt)) else None
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"doc": doc, "bounds": bounds})


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """The checks a field carries: floats finite, numbers inside their declared bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        fail(f.name, value, "must be a finite number")
    bounds = f.metadata.get("bounds")
    if bounds is not None and not bounds.ok(value):
        fail(f.name, value, f"must be in {bounds.describe()}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) into annotation ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(err.allowed)
        raise ConfigError(path, value, " or ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(path, value, "allowed: " + ", ".join(repr(a) for a in allowed))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"expected a mapping for {tp.__name__}")
        return from_dict(tp, value, path)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"expected a list for {_type_name(tp)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(path, value, f"expected {len(args)} items")
            items = [_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "expected a mapping")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-6" as a string
            except ValueError:
                pass
        raise ConfigError(path, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "expected a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, value, f"expected {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` from a nested dict. Unknown keys are errors; missing keys take defaults."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_join(path, unknown[0]), data[unknown[0]],
                          f"unknown key; {cls.__name__} accepts: " + ", ".join(sorted(names)))
    kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(path, data, f"cannot build {cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list view of a config (tuples become lists) for YAML dumps and logs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def validate(cfg: Any, path: str = "") -> None:
    """Run every field check and ``validate()`` hook in the tree, children first, turning failures into
    ConfigError with the full field path."""
    try:
        for f in dataclasses.fields(cfg):
            child = getattr(cfg, f.name)
            if dataclasses.is_dataclass(child):
                validate(child, _join(path, f.name))
            else:
                _check_field(f, child)
        hook = getattr(cfg, "validate", None)
        if callable(hook):
            hook()
    except _FieldFailure as err:
        raise ConfigError(_join(path, err.field), err.value, err.allowed) from None


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (values parsed as YAML scalars)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "overrides look like field.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(".".join(parts[: i + 1]), raw, "no such config section")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(key, raw, "no such config field")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return from_dict(type(cfg), data)


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file, apply overrides, validate."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    cfg = from_dict(cls, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def check_range(field: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Common numeric bound check for ``validate`` hooks."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        fail(field, value, f"must be in {left}{'-inf' if lo is None else lo}, "
                           f"{'inf' if hi is None else hi}{right}")
