"""Typed construction of frozen parameter dataclasses from TOML mappings.

Every configurable part of fedopt declares its knobs as a frozen dataclass.
:func:`build` turns a plain mapping (from TOML or ``--set``) into an instance:
unknown keys are rejected with a did-you-mean, values are checked against the
field's annotation (``int``, ``float``, ``bool``, ``str``, ``Literal``,
``X | None``, ``tuple[X, ...]``, ``Mapping``), and the class's own
``__post_init__`` checks run with errors re-keyed under the section name.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fedopt.errors import ConfigError, did_you_mean

__all__ = ["build", "check", "describe_type", "to_plain"]


def describe_type(tp: Any) -> str:
    """Human words for a type annotation, used in error messages and docs."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in get_args(tp) if a is not type(None)]
        opt = " or omitted" if type(None) in get_args(tp) else ""
        return " or ".join(parts) + opt
    if origin is tuple:
        return f"a list of {describe_type(get_args(tp)[0])}"
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        return "a table"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise :class:`ConfigError`."""
    origin = get_origin(tp)
    bad = ConfigError(key, value, describe_type(tp))
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        hint = did_you_mean(value, map(str, get_args(tp))) if isinstance(value, str) else ""
        raise ConfigError(key, value, describe_type(tp) + hint)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise bad
        inner = get_args(tp)[0]
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise bad
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def build(cls: type, mapping: Mapping[str, Any] | None, where: str) -> Any:
    """Build the frozen dataclass ``cls`` from ``mapping``.

    Parameters
    ----------
    cls : type
        A dataclass whose fields are the allowed keys.
    mapping : Mapping or None
        Raw values (TOML types). Missing keys take the field defaults.
    where : str
        Dotted prefix for error messages, e.g. ``"strategy"``.

    Returns
    -------
    object
        An instance of ``cls``.

    Raises
    ------
    ConfigError
        Unknown key (with did-you-mean), wrong type, a missing required key, or
        a value rejected by ``cls.__post_init__``.
    """
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError(where, mapping, "a table of keys")
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in mapping:
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "no keys"
            hint = did_you_mean(key, fields)
            raise ConfigError(f"{where}.{key}", mapping[key], f"a known key ({allowed}){hint}")
    kwargs = {}
    for name, field in fields.items():
        if name in mapping:
            kwargs[name] = _coerce(hints[name], mapping[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}", None, f"required: {describe_type(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        key = err.key if err.key.startswith(where + ".") else f"{where}.{err.key}"
        raise ConfigError(key, err.value, err.allowed) from None


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError(key, value, allowed)`` unless ``condition`` holds.

    Use it in ``__post_init__`` with the bare field name; :func:`build`
    prefixes the section.
    """
    if not condition:
        raise ConfigError(key, value, allowed)


def to_plain(obj: Any) -> Any:
    """Convert dataclasses, mapping proxies and tuples to TOML-ready plain values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
