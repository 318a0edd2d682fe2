"""Sweep grids and sweep-level overrides: ``[grid]`` expands to settings, ``--set seeds=[...]``.

A ``[grid]`` table maps dotted scenario keys to lists of values; the sweep's
settings become their product (crossed with any ``[[settings]]`` written out),
each labelled by its values::

    [grid]
    "partition.alpha" = [0.05, 0.5, 100]
    "client.lr" = [0.01, 0.1]          # 6 settings: "alpha=0.05, lr=0.01", ...

``--set`` overrides whose key is a sweep key (``seeds``, ``target_accuracy``,
``columns``, ``diagnose``, ``name``, ``grid.<key>``) change the sweep; the
others change every cell's scenario, as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from fedopt.config import apply_overrides
from fedopt.errors import ConfigError
from fedopt.tuning import dotted

__all__ = ["SWEEP_SET_KEYS", "apply_sweep_sets", "expand_grid"]

#: Sweep keys ``--set`` may change (``grid.KEY`` too); any other key is a scenario key.
SWEEP_SET_KEYS = ("seeds", "target_accuracy", "columns", "diagnose", "name", "grid")


def _is_sweep_key(item: str) -> bool:
    key = item.split("=", 1)[0].strip()
    return key in SWEEP_SET_KEYS or key.startswith("grid.")


def apply_sweep_sets(raw: Mapping[str, Any], sets: Sequence[str]) -> tuple[dict, list[str]]:
    """``raw`` with the sweep-level ``sets`` applied, and the scenario-level rest.

    ``grid."partition.alpha"=[0.1, 1.0]`` (or ``grid.partition.alpha=...``)
    sets one grid key; the grid's keys are dotted, so the rest of the key after
    ``grid.`` is taken whole.
    """
    out = dict(raw)
    rest: list[str] = []
    for item in sets:
        if "=" not in item or not _is_sweep_key(item):
            rest.append(item)
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("grid."):
            inner = key[len("grid.") :].strip('"')
            value = apply_overrides({}, [f"v={text}"])["v"]
            grid = dict(out.get("grid") or {}) if isinstance(out.get("grid"), Mapping) else {}
            grid[inner] = value
            out["grid"] = grid
        else:
            out = apply_overrides(out, [item])
    return out, rest


def _label(keys: Sequence[str], values: Sequence[Any]) -> str:
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, keys, strict=True)]
    return ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))


def expand_grid(grid: Any, settings: Any) -> Any:
    """The ``[[settings]]`` tables with ``grid``'s product crossed in (``settings`` if no grid).

    Raises
    ------
    ConfigError
        ``grid`` is not a table of dotted keys to non-empty lists of scalars.
    """
    from fedopt.compare import merge

    if grid is None:
        return settings
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError(
            "grid", grid, 'a table of dotted keys to value lists ("client.lr" = [...])'
        )
    for key, values in grid.items():
        if "." not in key or any(not part for part in key.split(".")):
            raise ConfigError(f"grid.{key}", values, 'a dotted scenario key, e.g. "client.lr"')
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, (bool, int, float, str)) for v in values)
            or len(set(map(repr, values))) != len(values)
        ):
            raise ConfigError(f"grid.{key}", values, "a non-empty list of distinct values")
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        over: dict[str, Any] = {}
        for k, v in zip(keys, values, strict=True):
            over = merge(over, dotted(k, v))
        points.append((_label(keys, values), over))
    if settings is None:
        return [{"label": label, **over} for label, over in points]
    if not isinstance(settings, list) or not all(isinstance(s, Mapping) for s in settings):
        return settings  # the settings check names it
    out = []
    for table in settings:
        for label, over in points:
            body = {k: v for k, v in table.items() if k != "label"}
            out.append({"label": f"{table.get('label')}, {label}", **merge(body, over)})
    return out
