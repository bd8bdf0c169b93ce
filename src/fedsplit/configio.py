"""TOML files and ``section.key=value`` overrides in, typed config dataclasses out, and back.

Config is flat dataclasses (a run config may nest them one level: ``RunConfig(model:
ModelConfig, train: TrainConfig)``). This module only fills them: it checks each value against
the field's annotation and rejects unknown keys; the values' meaning is checked by each
dataclass's own ``__post_init__``. Supported annotations: ``bool``, ``int``, ``float`` (ints
accepted), ``str``, ``Path``, ``Enum`` subclasses, ``Literal[...]``, ``list[X]``,
``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, ``X | None``, unions of these, ``Any``
and nested dataclasses.

TOML has no null: ``dump_config`` omits a ``None`` field, so it round-trips only when the field's
default is ``None`` (otherwise ``dump_config`` refuses). In an override, the bare word ``none``
sets a field that allows ``None`` to ``None``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")
Keys = tuple[str, ...]  # a path into the config: ("train", "lr"), ("train", "layers", "[2]")


class ConfigError(ValueError):
    """A config file or override does not fit the config dataclasses."""


class _Mismatch(Exception):
    """A value does not fit an annotation; becomes ``ConfigError`` once its location is known."""

    def __init__(self, keys: Keys, message: str) -> None:
        super().__init__(message)
        self.keys = keys
        self.message = message


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where values came from, for error messages: the file, and which keys overrides set."""

    source: str
    overridden: Mapping[Keys, str] = dataclasses.field(default_factory=dict)

    def where(self, keys: Keys) -> str:
        """The override that set ``keys`` (or a table above it), else the file."""
        for end in range(len(keys), 0, -1):
            if keys[:end] in self.overridden:
                return f"override {self.overridden[keys[:end]]!r}"
        return self.source

    def scope(self, keys: Keys) -> str:
        """The file plus the overrides that set anything inside the table at ``keys``."""
        inside = [text for at, text in self.overridden.items() if at[: len(keys)] == keys]
        if not inside and self.where(keys) != self.source:
            return self.where(keys)
        return self.source + (f" with overrides {inside}" if inside else "")

    def error(self, keys: Keys, message: str) -> ConfigError:
        located = f"key {_dotted(keys)!r}: {message}" if keys else message
        return ConfigError(f"{self.where(keys)}: {located}")


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type[T], path: Path | str | None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the TOML file at ``path`` (``None``: defaults only), then ``overrides``.

    Each override is ``section.key=value`` (``key=value`` for a top-level field); the value is
    read as a TOML literal (``3``, ``2e-4``, ``true``, ``[1, 2]``, ``"x"``) and, if it is not one,
    or the field wants a string, as plain text.
    """
    _check_dataclass_type(cls)
    source = str(path) if path is not None else "<defaults>"
    table = _read_toml(Path(path)) if path is not None else {}
    overridden: dict[Keys, str] = {}
    for override in overrides:
        keys, value = _parse_override(cls, override)
        _set_in(table, keys, value, override)
        overridden[keys] = override
    return _build(cls, table, (), _Origin(source, overridden))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: expected valid TOML, got {err}") from err


def _build(cls: type[T], table: Any, keys: Keys, origin: _Origin) -> T:
    """``cls(**fields)`` from a TOML table; mismatches become ``ConfigError`` naming the key."""
    if not isinstance(table, Mapping):
        raise _Mismatch(keys, f"expected a table for {cls.__name__}, got {_describe(table)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [name for name in table if name not in fields]
    if unknown:
        where = origin.where((*keys, unknown[0]))
        raise ConfigError(f"{where}: {_unknown(keys, unknown[0], table, fields)}")
    kwargs = {}
    for name, field in fields.items():
        try:
            if name in table:
                kwargs[name] = _coerce(table[name], hints[name], (*keys, name), origin)
            elif not _has_default(field):
                kwargs[name] = _missing(hints[name], (*keys, name), origin)
        except _Mismatch as err:
            raise origin.error(err.keys, err.message) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # the dataclass's own __post_init__ said no
        section = f"[{_dotted(keys)}] " if keys else ""
        raise ConfigError(f"{origin.scope(keys)}: {section}{cls.__name__}: {err}") from err


def _missing(annotation: Any, keys: Keys, origin: _Origin) -> Any:
    """A nested dataclass without a table is built from its defaults; anything else is required."""
    if _is_dataclass_type(annotation):
        return _build(annotation, {}, keys, origin)
    expected = _type_name(annotation)
    raise _Mismatch(keys, f"expected a value of type {expected}, got nothing (required)")


def _unknown(keys: Keys, name: str, table: Mapping[str, Any], fields: Mapping[str, Any]) -> str:
    kind = "section" if isinstance(table[name], Mapping) else "key"
    scope = f"[{_dotted(keys)}]" if keys else "the top level"
    return f"unknown {kind} {_dotted((*keys, name))!r}; valid keys in {scope}: {', '.join(fields)}"


def _coerce(value: Any, annotation: Any, keys: Keys, origin: _Origin) -> Any:
    """``value`` converted to ``annotation``, or ``_Mismatch``."""
    kind = get_origin(annotation)
    if annotation is Any:
        return value
    if kind is Literal:
        return _coerce_literal(value, annotation, keys)
    if kind is Union or kind is types.UnionType:
        return _coerce_union(value, annotation, keys, origin)
    if kind in (list, tuple) or annotation in (list, tuple):
        return _coerce_sequence(value, annotation, keys, origin)
    if kind is dict or annotation is dict:
        return _coerce_dict(value, annotation, keys, origin)
    if _is_dataclass_type(annotation):
        return _build(annotation, value, keys, origin)
    return _coerce_scalar(value, annotation, keys)


def _coerce_scalar(value: Any, annotation: Any, keys: Keys) -> Any:
    if annotation is type(None) and value is None:
        return None
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    if _is_path_type(annotation) and isinstance(value, (str, PurePath)):
        return annotation(value)
    if _is_class(annotation) and issubclass(annotation, enum.Enum):
        return _coerce_enum(value, annotation, keys)
    if annotation in (type(None), bool, int, float, str) or _is_path_type(annotation):
        raise _Mismatch(keys, f"expected {_type_name(annotation)}, got {_describe(value)}")
    raise TypeError(f"{_dotted(keys)}: unsupported annotation {annotation!r} in a config dataclass")


def _coerce_enum(value: Any, annotation: type[enum.Enum], keys: Keys) -> enum.Enum:
    if isinstance(value, annotation):
        return value
    try:
        return annotation(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in annotation)
        raise _Mismatch(keys, f"expected one of {valid}, got {_describe(value)}") from None


def _coerce_literal(value: Any, annotation: Any, keys: Keys) -> Any:
    for allowed in get_args(annotation):
        if value == allowed and type(value) is type(allowed):
            return value
    valid = ", ".join(repr(allowed) for allowed in get_args(annotation))
    raise _Mismatch(keys, f"expected one of {valid}, got {_describe(value)}")


def _coerce_union(value: Any, annotation: Any, keys: Keys, origin: _Origin) -> Any:
    for arm in get_args(annotation):  # the first arm that fits wins: `int | str`, not `str | int`
        try:
            return _coerce(value, arm, keys, origin)
        except _Mismatch:
            continue
    raise _Mismatch(keys, f"expected {_type_name(annotation)}, got {_describe(value)}")


def _coerce_sequence(
    value: Any, annotation: Any, keys: Keys, origin: _Origin
) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(keys, f"expected {_type_name(annotation)}, got {_describe(value)}")
    types_ = _item_types(annotation, len(value), keys)
    items = [
        _coerce(item, tp, (*keys, f"[{i}]"), origin)
        for i, (item, tp) in enumerate(zip(value, types_, strict=False))
    ]
    return tuple(items) if (get_origin(annotation) or annotation) is tuple else items


def _item_types(annotation: Any, length: int, keys: Keys) -> list[Any]:
    args = get_args(annotation)
    if not args:
        return [Any] * length
    if get_origin(annotation) is list or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * length
    if len(args) != length:
        expected = f"{len(args)} items for {_type_name(annotation)}"
        raise _Mismatch(keys, f"expected {expected}, got {length}")
    return list(args)


def _coerce_dict(value: Any, annotation: Any, keys: Keys, origin: _Origin) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _Mismatch(keys, f"expected {_type_name(annotation)}, got {_describe(value)}")
    args = get_args(annotation)
    key_type, item_type = args if args else (str, Any)
    if key_type is not str:
        raise TypeError(
            f"{_dotted(keys)}: expected dict[str, ...] in a config dataclass, got {annotation!r}"
        )
    return {str(k): _coerce(item, item_type, (*keys, str(k)), origin) for k, item in value.items()}


# ---------------------------------------------------------------------------------------------
# Overrides


def _parse_override(cls: type, override: str) -> tuple[Keys, Any]:
    dotted, sep, raw = override.partition("=")
    keys = tuple(part.strip() for part in dotted.split("."))
    if not sep or not all(keys):
        raise ConfigError(f"override {override!r}: expected section.key=value")
    annotation = _annotation_at(cls, keys, override)
    return keys, _override_value(raw.strip(), annotation)


def _annotation_at(cls: type, keys: Keys, override: str) -> Any:
    """The annotation at ``keys`` inside ``cls``; unknown keys fail listing the valid ones."""
    annotation: Any = cls
    for depth, name in enumerate(keys):
        annotation = _without_none(annotation)
        if _is_dataclass_type(annotation):
            hints = get_type_hints(annotation)
            fields = [f.name for f in dataclasses.fields(annotation) if f.init]
            if name not in fields:
                scope = f"[{_dotted(keys[:depth])}]" if depth else "the top level"
                raise ConfigError(
                    f"override {override!r}: unknown key {_dotted(keys[: depth + 1])!r}; "
                    f"valid keys in {scope}: {', '.join(fields)}"
                )
            annotation = hints[name]
        elif get_origin(annotation) is dict or annotation is dict:
            annotation = (get_args(annotation) or (str, Any))[1]
        elif annotation is not Any:
            holds = _type_name(annotation)
            raise ConfigError(
                f"override {override!r}: {_dotted(keys[:depth])!r} holds {holds}, not a table"
            )
    return annotation


def _override_value(raw: str, annotation: Any) -> Any:
    if raw == "none" and _allows_none(annotation):
        return None
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw  # plain text: `model.name=smollm2-135m`
    if set(parsed) != {"value"}:  # e.g. a newline smuggling in another key: keep it as text
        return raw
    value = parsed["value"]
    return raw if _wants_text(annotation) and not isinstance(value, str) else value


def _set_in(table: dict[str, Any], keys: Keys, value: Any, override: str) -> None:
    """Put ``value`` at ``keys``; a table value is merged into the table already there."""
    for depth, name in enumerate(keys[:-1]):
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            at = _dotted(keys[: depth + 1])
            raise ConfigError(f"override {override!r}: {at!r} is not a table in the file")
    existing = table.get(keys[-1])
    if isinstance(existing, dict) and isinstance(value, dict):
        for name, item in value.items():
            _set_in(existing, (name,), item, override)
    else:
        table[keys[-1]] = value


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        arms = [arm for arm in get_args(annotation) if arm is not type(None)]
        return arms[0] if len(arms) == 1 else annotation
    return annotation


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or (
        get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
    )


def _wants_text(annotation: Any) -> bool:
    """True if the field takes only text, so `name=123` or `day=2024-01-01` stay strings."""
    annotation = _without_none(annotation)
    if get_origin(annotation) is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    return annotation is str or _is_path_type(annotation)


# ---------------------------------------------------------------------------------------------
# Dumping


def config_to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass as plain data: nested dicts, lists, str/int/float/bool/None (paths as str)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def dump_config(obj: Any) -> str:
    """The dataclass as TOML text that ``load_config(type(obj), ...)`` reads back equal."""
    table = config_to_dict(obj)
    _check_nones(obj, ())
    lines = _emit_table(table, ())
    return "\n".join(lines).lstrip("\n") + "\n"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_nones(obj: Any, keys: Keys) -> None:
    """Refuse a ``None`` that omitting would not restore (TOML has no null)."""
    for field in dataclasses.fields(obj):
        if not field.init:
            continue
        value, where = getattr(obj, field.name), (*keys, field.name)
        if value is None and field.default is not None:
            message = f"cannot write None to TOML; {_instead(field)}"
            raise ConfigError(f"key {_dotted(where)!r}: {message}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_nones(value, where)
        elif isinstance(value, (Mapping, list, tuple)):
            _check_no_none_inside(value, where)


def _check_no_none_inside(value: Any, keys: Keys) -> None:
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = [(f"[{i}]", item) for i, item in enumerate(value)]
    for name, item in items:
        if item is None:
            raise ConfigError(f"key {_dotted((*keys, str(name)))!r}: cannot write None to TOML")
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            _check_nones(item, (*keys, str(name)))
        elif isinstance(item, (Mapping, list, tuple)):
            _check_no_none_inside(item, (*keys, str(name)))


def _emit_table(table: Mapping[str, Any], keys: Keys) -> list[str]:
    """``key = value`` lines first, then one ``[section]`` per nested table (TOML's order)."""
    lines = ["", f"[{'.'.join(_toml_key(k) for k in keys)}]"] if keys else []
    subtables = []
    for name, value in table.items():
        if value is None:  # allowed by _check_nones: the default is None
            continue
        if isinstance(value, Mapping):
            subtables.append((name, value))
        else:
            lines.append(f"{_toml_key(name)} = {_toml_value(value, (*keys, name))}")
    for name, value in subtables:
        lines.extend(_emit_table(value, (*keys, name)))
    return lines


def _toml_value(value: Any, keys: Keys) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; "inf", "-inf", "nan" are TOML too
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        items = (_toml_value(item, (*keys, f"[{i}]")) for i, item in enumerate(value))
        return "[" + ", ".join(items) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(k)} = {_toml_value(v, (*keys, k))}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"key {_dotted(keys)!r}: cannot write {_describe(value)} to TOML")


_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"
}


def _toml_string(text: str) -> str:
    def escape(char: str) -> str:
        if char in _ESCAPES:
            return _ESCAPES[char]
        return f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char

    return '"' + "".join(escape(char) for char in text) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_dataclass_type(cls: Any) -> None:
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


def _is_class(annotation: Any) -> bool:
    """A plain class, not a generic alias (on 3.10 ``isinstance(list[int], type)`` is True)."""
    return isinstance(annotation, type) and get_origin(annotation) is None


def _is_path_type(annotation: Any) -> bool:
    return _is_class(annotation) and issubclass(annotation, PurePath)


def _is_dataclass_type(annotation: Any) -> bool:
    return _is_class(annotation) and dataclasses.is_dataclass(annotation)


def _has_default(field: dataclasses.Field[Any]) -> bool:
    missing = dataclasses.MISSING
    return field.default is not missing or field.default_factory is not missing


def _instead(field: dataclasses.Field[Any]) -> str:
    """What loading would do with the key left out."""
    if field.default is not dataclasses.MISSING:
        return f"omitting it would load the default ({field.default!r}) instead"
    if field.default_factory is not dataclasses.MISSING:
        return "omitting it would load the default_factory's value instead"
    return "the field is required, so it cannot be omitted"


def _dotted(keys: Keys) -> str:
    # ("train", "layers", "[2]") -> "train.layers[2]"
    return "".join(k if k.startswith("[") or i == 0 else f".{k}" for i, k in enumerate(keys))


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if _is_class(annotation):
        return annotation.__name__
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in get_args(annotation))
    return repr(annotation).replace("typing.", "").replace("pathlib.", "")


def _describe(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60] + '...' if len(shown) > 60 else shown}"
