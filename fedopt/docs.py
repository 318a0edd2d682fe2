"""The scenario reference, generated from the section classes and the registries.

Types and defaults come from the dataclasses; the "allowed" column comes from
the validators themselves (each numeric key is probed with out-of-range
values and the validator's own words are quoted), so the reference cannot
drift from what the code accepts. ``fedopt reference`` prints it; the README
embeds it and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from fedopt import registry as reg
from fedopt.config import _SPECS
from fedopt.errors import ConfigError
from fedopt.params import build, describe_type

__all__ = ["scenario_reference"]

_PROBES = {int: (-1, 0), float: (-1.0, 0.0, 1.0, 100.0)}


def _allowed(cls: type, name: str, tp: Any) -> str:
    base = getattr(tp, "__args__", None)
    kinds = [t for t in (base or (tp,)) if t in _PROBES]
    for kind in kinds:
        for probe in _PROBES[kind]:
            try:
                build(cls, {name: probe}, "x")
            except ConfigError as err:
                if err.key == f"x.{name}":
                    return err.allowed
            except Exception:  # noqa: BLE001  (other required keys: nothing to learn)
                break
    return describe_type(tp)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        return "-"
    else:
        return "required"
    if value is None:
        return "omitted"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(repr, value)) + "]"
    return repr(value).replace("'", '"')


def _rows(cls: type, name_key: str | None = None) -> list[str]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "params":
            continue
        allowed = _allowed(cls, f.name, hints[f.name]).replace("|", "\\|")
        if f.name == name_key:
            allowed = "a registered name, listed below"
        out.append(f"| `{f.name}` | {describe_type(hints[f.name])} | {_default(f)} | {allowed} |")
    return out


_HEAD = ["| key | type | default | allowed |", "|---|---|---|---|"]


def scenario_reference() -> str:
    """Markdown for every scenario key, section by section, component by component."""
    reg.load_builtins()
    lines = []
    for section, spec in _SPECS.items():
        key = spec.name_key if spec.registry is not None else None
        lines += [f"#### `[{section}]`", "", *(_HEAD), *_rows(spec.cls, key), ""]
        if spec.registry is None:
            continue
        lines.append(f"`{spec.name_key}` is one of the registered {spec.registry.kind}s:")
        lines.append("")
        for entry in spec.registry:
            fields = dataclasses.fields(entry.params)
            what = entry.doc or entry.name
            lines.append(f"- `{entry.name}`: {what}" + ("" if fields else " No parameters."))
            if fields:
                lines += ["", *(_HEAD), *_rows(entry.params), ""]
        if section == "model":
            lines.append('- `"package.module:factory"`: your own model ("Plugging in a model").')
        lines.append("")
    for entry in reg.SECTIONS:
        lines += [f"#### `[{entry.name}]`", "", entry.doc, "", *(_HEAD), *_rows(entry.obj), ""]
    return "\n".join(lines).rstrip() + "\n"
