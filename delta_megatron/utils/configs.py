"""Typed dataclass configs: strict loading, dotted overrides, validation that names the field.

Every component owns a ``@dataclass`` config next to its code (torchtitan style), subclassing
:class:`Section` so Python assignments are type-checked and unknown attributes rejected. This module is
the machinery they share: building a config from a nested dict (YAML), type coercion driven by the
annotations, rejecting unknown keys (listing the valid ones, closest first), dotted command-line
overrides (``algo.loss.name=sapo``) and error messages of the form
``credit.delta.lambda_range: (1.2, 0.8) — lower bound must be < upper bound``.

Every field is declared with :func:`option`: its one-line meaning and, for numbers, its allowed range
live in the dataclass itself — one source for validation and for ``delta-megatron config explain``;
every float must be finite. Cross-field rules go in the section's ``validate(self)`` hook and raise via
:func:`fail`; :func:`validate` walks the tree and prefixes the field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import weakref
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
    """A numeric field's allowed range (``None`` = unbounded on that side). A field declared with
    ``Bounds()`` (``option(..., unbounded=True)``) takes any finite value."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, value: float) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le)
                    or (self.lt is not None and value >= self.lt))

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``[0, 1)``, or ``any finite number``."""
        lo = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        hi = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if lo and hi:
            return f"{'[' if lo[0] == '>=' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == '<=' else ')'}"
        if lo or hi:
            op, v = lo or hi
            return f"{op} {v:g}"
        return "any finite number"


def option(default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, unbounded: bool = False) -> Any:
    """A config field with its meaning and allowed range, e.g.
    ``lr: float = option(5e-4, "peak learning rate", gt=0)``; :func:`validate` enforces the range
    (``None`` passes for optional fields; each item of a numeric tuple/list is checked) and
    ``config explain`` prints both. Every numeric field declares a range; ``unbounded=True`` says
    "any finite number" explicitly."""
    declared = unbounded or any(b is not None for b in (ge, gt, le, lt))
    bounds = Bounds(ge, gt, le, lt) if declared else None
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"doc": doc, "bounds": bounds})


def field_doc(f: dataclasses.Field) -> str:
    """The one-line meaning of a config field (``option(..., doc)``), or ''."""
    return f.metadata.get("doc", "")


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get("bounds")


def _check_number(name: str, value: Any, bounds: Bounds | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        fail(name, value, "must be a finite number")
    if bounds is not None and not bounds.ok(value):
        text = bounds.describe()
        fail(name, value, f"must be {text}" if text[0] in "<>" else f"must be in {text}")


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """The checks a field carries: floats finite, numbers (and items of numeric tuples/lists) inside
    their declared bounds."""
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_number(f"{f.name}[{i}]", item, field_bounds(f))
    else:
        _check_number(f.name, value, field_bounds(f))


def closest_first(name: str, names: typing.Iterable[str]) -> list[str]:
    """``names`` ordered by similarity to ``name`` (most similar first, ties alphabetical)."""
    return sorted(names, key=lambda n: (-difflib.SequenceMatcher(None, name, n).ratio(), n))


def unknown_key(cls: type, name: str) -> str:
    """What an error says about an unknown key of ``cls``: its valid names, closest first."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    return f"unknown key; {cls.__name__} accepts (closest first): " + ", ".join(closest_first(name, names))


class Section:
    """Base of every config dataclass: assigning an unknown attribute is an error naming the valid
    ones, and every assignment (``__init__`` included) is type-checked and coerced against the
    annotation (``cfg.train.lr = "abc"`` fails, ``= 1`` stores ``1.0``). A section attached to a
    parent remembers where (a weak reference), so errors carry the full path (``algo.reward``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        types_ = _field_types(type(self))
        if name not in types_:
            raise ConfigError(config_path(self, name), value, unknown_key(type(self), name))
        try:
            value = _coerce(types_[name], value, name, strict=True)
        except ConfigError as err:
            raise ConfigError(_join(config_path(self), err.path), err.value, err.allowed) from None
        object.__setattr__(self, name, value)
        if isinstance(value, Section):
            object.__setattr__(value, "_cfg_parent", (weakref.ref(self), name))

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: no weak references
        return {k: v for k, v in self.__dict__.items() if k != "_cfg_parent"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name, value in state.items():
            if isinstance(value, Section):
                object.__setattr__(value, "_cfg_parent", (weakref.ref(self), name))


def config_path(section: Any, name: str = "") -> str:
    """Dotted path of ``section`` (plus ``name``) from the root config it is attached to."""
    parts = [name] if name else []
    node = section
    while True:
        link = getattr(node, "_cfg_parent", None) if isinstance(node, Section) else None
        parent = link[0]() if link else None
        if parent is None:
            break
        parts.append(link[1])
        node = parent
    return ".".join(reversed(parts))


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str, strict: bool = False) -> Any:
    """Convert ``value`` (from YAML or a CLI string) into annotation ``tp`` or raise ConfigError.
    ``strict`` (Python assignment): no number parsing from strings, no float for an int."""
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
                return _coerce(option, value, path, strict)
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
            items = [_coerce(a, v, f"{path}[{i}]", strict) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "expected a mapping")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, path, strict): _coerce(val_tp, v, f"{path}.{k}", strict)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and not strict:
            return int(value)
        raise ConfigError(path, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and not strict:
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


def type_text(tp: Any) -> str:
    """A field's annotation as a reader expects it: ``int | null``, ``one of 'a', 'b'``, ``list[str]``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(tp, "__name__", str(tp))


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def walk_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every field of the config class tree under ``cls`` as (dotted path, Field, annotation), parents
    before their children, in declaration order."""
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        path = _join(prefix, f.name)
        yield path, f, tp
        if dataclasses.is_dataclass(tp):
            yield from walk_fields(tp, path)


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build ``cls`` from a nested dict. Unknown keys are errors (naming the valid keys, closest
    first); missing keys take defaults."""
    data = dict(data or {})
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_join(path, unknown[0]), data[unknown[0]], unknown_key(cls, unknown[0]))
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
    ConfigError with the full field path (errors a hook raises for a nested object get the prefix)."""
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            validate(child, _join(path, f.name))
            continue
        try:
            _check_field(f, child)
        except _FieldFailure as err:
            raise ConfigError(_join(path, err.field), err.value, err.allowed) from None
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        try:
            hook()
        except _FieldFailure as err:
            raise ConfigError(_join(path, err.field), err.value, err.allowed) from None
        except ConfigError as err:
            raise ConfigError(_join(path, err.path), err.value, err.allowed) from None


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (values parsed as YAML scalars).
    An unknown key is reported by :func:`from_dict` with its full path and the valid names."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "overrides look like field.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[: i + 1]), raw, "is a value, not a config section")
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
