"""Sweeps: strategies x heterogeneity settings x seeds, run cell by cell, one comparison table.

A sweep file names a base scenario and the variants to cross::

    name = "heterogeneity"
    base = "quickstart.toml"        # relative to the sweep file
    seeds = [0, 1, 2]
    target_accuracy = 0.9           # optional: rounds / simulated time to reach it
    columns = ["epsilon_max"]       # optional: extra metrics (final value, mean ± std)

    [scenario]                      # merged over the base for every cell
    run.rounds = 15

    [[strategies]]
    label = "fedprox"
    strategy.name = "fedprox"
    strategy.proximal_mu = 0.01

    [[settings]]
    label = "alpha=0.05"
    partition.name = "dirichlet"
    partition.alpha = 0.05

Every variant is a partial scenario merged over the base. All cells are
validated before the first one runs, so a typo in the last variant costs
nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedopt.config import Scenario, apply_overrides, parse_scenario, read_toml
from fedopt.errors import ConfigError, did_you_mean
from fedopt.simulation import make_run_dir, run_batch
from fedopt.tables import CellResult, write_compare

__all__ = ["Sweep", "Variant", "load_sweep", "run_sweep"]

_KEYS = (
    "name",
    "base",
    "seeds",
    "target_accuracy",
    "columns",
    "scenario",
    "strategies",
    "settings",
)


@dataclass(frozen=True)
class Variant:
    """One labelled partial scenario."""

    label: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the base scenario mapping and the variants to cross."""

    name: str
    base: Mapping[str, Any]
    strategies: tuple[Variant, ...]
    settings: tuple[Variant, ...]
    seeds: tuple[int, ...]
    target: float | None
    columns: tuple[str, ...] = ()

    def cells(self) -> list[tuple[Variant, Variant, int, Scenario]]:
        """Every (strategy, setting, seed, scenario) cell, settings outermost."""
        out = []
        for setting in self.settings:
            for strategy in self.strategies:
                for seed in self.seeds:
                    raw = merge(merge(self.base, setting.overrides), strategy.overrides)
                    raw = merge(raw, {"run": {"seed": seed}, "name": self.name})
                    out.append((strategy, setting, seed, parse_scenario(raw)))
        return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (tables merge, values replace)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _variants(raw: Any, key: str) -> tuple[Variant, ...]:
    if raw is None:
        return (Variant("base", {}),)
    if not isinstance(raw, list) or not raw or not all(isinstance(v, Mapping) for v in raw):
        raise ConfigError(key, raw, f"a non-empty array of tables ([[{key}]])")
    out, seen = [], set()
    for i, table in enumerate(raw):
        label = table.get("label")
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{key}[{i}].label", label, "a non-empty string")
        if label in seen:
            raise ConfigError(f"{key}[{i}].label", label, "a label not used by another variant")
        seen.add(label)
        out.append(Variant(label, {k: v for k, v in table.items() if k != "label"}))
    return tuple(out)


def load_sweep(path: str | Path, sets: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file; ``sets`` override the base scenario."""
    path = Path(path)
    raw = read_toml(path)
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(
                key, raw[key], f"a sweep key ({', '.join(_KEYS)}){did_you_mean(key, _KEYS)}"
            )
    base: dict[str, Any] = {}
    if "base" in raw:
        if not isinstance(raw["base"], str):
            raise ConfigError("base", raw["base"], "the path of a scenario file")
        try:
            base = read_toml(path.parent / raw["base"])
        except ConfigError as err:  # name the sweep's key, not the base file's
            raise ConfigError("base", raw["base"], err.allowed) from None
    if not isinstance(raw.get("scenario", {}), Mapping):
        raise ConfigError("scenario", raw["scenario"], "a table of scenario keys ([scenario])")
    base = merge(base, raw.get("scenario", {}))
    base = apply_overrides(base, sets)
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError("seeds", seeds, "a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", seeds, "distinct seeds")
    target = raw.get("target_accuracy")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1
    ):
        raise ConfigError("target_accuracy", target, "a number in (0, 1]")
    columns = raw.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise ConfigError("columns", columns, 'a list of metric names, e.g. ["epsilon_max"]')
    name = raw.get("name", path.stem)
    sweep = Sweep(
        name=name,
        base=base,
        strategies=_variants(raw.get("strategies"), "strategies"),
        settings=_variants(raw.get("settings"), "settings"),
        seeds=tuple(seeds),
        target=float(target) if target is not None else None,
        columns=tuple(columns),
    )
    sweep.cells()
    return sweep


def run_sweep(
    sweep: Sweep,
    *,
    out: Path = Path("runs"),
    ray_address: str | None = None,
    on_cell: Callable[[int, CellResult], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run every cell in one federation, then write the comparison table and overlay plots."""
    out_dir = make_run_dir(Path(out), sweep.name)
    cells = sweep.cells()
    scenarios = [sc for *_, sc in cells]
    if ray_address:
        scenarios = [sc.replace(**{"run.ray_address": ray_address}) for sc in scenarios]
    dirs = [
        out_dir / "cells" / _slug(setting.label) / _slug(strategy.label) / f"seed{seed}"
        for strategy, setting, seed, _ in cells
    ]
    results: list[CellResult] = []

    def done(i: int, res: Any) -> None:
        strategy, setting, seed, _ = cells[i]
        cell = CellResult(
            strategy=strategy.label,
            setting=setting.label,
            seed=seed,
            rows=tuple(res.rows),
            summary=res.summary,
            run_dir=str(res.run_dir),
        )
        results.append(cell)
        if on_cell is not None:
            on_cell(i + 1, cell)

    run_batch(scenarios, dirs, on_done=done)
    paths = write_compare(
        results, out_dir, target=sweep.target, title=sweep.name, columns=sweep.columns
    )
    return out_dir, paths


def _slug(text: str) -> str:
    from fedopt.plots import slug

    return slug(text)
