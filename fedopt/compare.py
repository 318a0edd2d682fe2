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

from fedopt.claims import Claim, parse_claims
from fedopt.config import Scenario, apply_overrides, parse_scenario, read_toml
from fedopt.errors import ConfigError, did_you_mean
from fedopt.simulation import load_result, run_batch
from fedopt.tables import CellResult, write_compare
from fedopt.tuning import Tune, check_seeds, dotted, parse_tune

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
    "paper",
    "expect",
    "diagnose",
    "tune",
    "quick",
    "grid",
)
_QUICK_KEYS = ("seeds", "scenario", "strategies", "settings", "tune")


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
    paper: str = ""
    claims: tuple[Claim, ...] = ()
    diagnose: tuple[str, ...] = ()
    tune: Tune | None = None

    def cells(
        self, chosen: Mapping[tuple[str, str], Any] | None = None
    ) -> list[tuple[Variant, Variant, int, Scenario]]:
        """Every (strategy, setting, seed, scenario) cell, settings outermost.

        ``chosen[(strategy, setting)]`` is the tuned value of ``self.tune.key``
        for that pair (see :mod:`fedopt.tuning`).
        """
        out = []
        for setting in self.settings:
            for strategy in self.strategies:
                for seed in self.seeds:
                    raw = self._raw(strategy, setting, seed)
                    if chosen and self.tune and (strategy.label, setting.label) in chosen:
                        value = chosen[(strategy.label, setting.label)]
                        raw = merge(raw, dotted(self.tune.key, value))
                    out.append((strategy, setting, seed, parse_scenario(raw)))
        return out

    def tuning_cells(self) -> list[tuple[Variant, Variant, Any, int, Scenario]]:
        """The ``[tune]`` grid: (strategy, setting, value, tuning seed, scenario) cells."""
        if self.tune is None:
            return []
        out = []
        for setting in self.settings:
            for strategy in self.strategies:
                if strategy.label not in self.tune.strategies:
                    continue
                for value in self.tune.values:
                    for seed in self.tune.seeds:
                        raw = merge(
                            self._raw(strategy, setting, seed), dotted(self.tune.key, value)
                        )
                        out.append((strategy, setting, value, seed, parse_scenario(raw)))
        return out

    def _raw(self, strategy: Variant, setting: Variant, seed: int) -> dict[str, Any]:
        raw = merge(merge(self.base, setting.overrides), strategy.overrides)
        return merge(raw, {"run": {"seed": seed}, "name": self.name})


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


def _quick(raw: dict[str, Any], *, apply: bool) -> dict[str, Any]:
    """The sweep's quick tier: ``[quick]`` applied over the sweep's own keys.

    The table is validated on every load (``apply`` false returns ``raw``), so a
    typo in it shows before the full tier runs, not first in CI.
    """
    quick = raw.get("quick", {})
    if not isinstance(quick, Mapping):
        raise ConfigError("quick", quick, "a table of quick-tier keys ([quick])")
    for key in quick:
        if key not in _QUICK_KEYS:
            raise ConfigError(f"quick.{key}", quick[key], f"one of {', '.join(_QUICK_KEYS)}")
    for key in ("strategies", "settings"):
        keep = quick.get(key, [])
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise ConfigError(f"quick.{key}", keep, f"a list of {key} labels to keep")
        entries = raw.get(key) if isinstance(raw.get(key), list) else []
        labels = [v.get("label") for v in entries if isinstance(v, Mapping)]
        for label in keep:
            if label not in labels:
                raise ConfigError(f"quick.{key}", label, f"a label of the sweep's {key}")
    if not apply:
        return raw
    out = dict(raw)
    if "seeds" in quick:
        out["seeds"] = quick["seeds"]
    out["scenario"] = merge(raw.get("scenario", {}), quick.get("scenario", {}))
    if "tune" in quick and isinstance(raw.get("tune"), Mapping):
        out["tune"] = merge(raw["tune"], quick["tune"])
    for key in ("strategies", "settings"):
        if key in quick:
            out[key] = [
                v for v in raw[key] if isinstance(v, Mapping) and v.get("label") in quick[key]
            ]
    tune = out.get("tune")
    if (
        "strategies" in quick
        and isinstance(tune, Mapping)
        and isinstance(tune.get("strategies"), list)
    ):
        out["tune"] = {
            **tune,
            "strategies": [s for s in tune["strategies"] if s in quick["strategies"]],
        }
    if "expect" in raw and ("strategies" in quick or "settings" in quick):
        out["expect"] = [k for row in raw["expect"] if (k := _kept(row, out)) is not None]
    return out


def _kept(row: Any, raw: Mapping[str, Any]) -> Any:
    """``row`` (an ``[[expect]]`` claim) limited to the variants ``raw`` keeps, or None.

    A claim about a strategy the quick tier leaves out is dropped, and so is
    one whose settings are all left out.
    """
    if not isinstance(row, Mapping):
        return row  # parse_claims names the bad row
    names = {v.get("label") for v in raw.get("strategies") or () if isinstance(v, Mapping)}
    wanted = {row.get("better"), row.get("than", row.get("better"))}
    if raw.get("strategies") is not None and not wanted <= names:
        return None
    if raw.get("settings") is None:
        return row
    kept = [v.get("label") for v in raw["settings"] if isinstance(v, Mapping)]
    wanted = row.get("settings", kept)
    settings = [s for s in wanted if s in kept] if isinstance(wanted, list) else wanted
    if not isinstance(settings, list):
        return row  # parse_claims names the bad value
    if not settings or (row.get("kind") == "gap_grows" and len(settings) < 2):
        return None
    return {**row, "settings": settings}


def load_sweep(path: str | Path, sets: Sequence[str] = (), *, quick: bool = False) -> Sweep:
    """Read and validate a sweep file; ``sets`` override the base scenario.

    A ``set`` whose key is a sweep key (``seeds``, ``target_accuracy``,
    ``columns``, ``diagnose``, ``name``, ``grid.KEY``) overrides the sweep
    instead; a ``[grid]`` table expands to settings (:mod:`fedopt.sweep_grid`).

    ``quick`` reads the sweep's quick tier (its ``[quick]`` table: fewer seeds,
    rounds, variants), the smoke test of a reproduction.
    """
    from fedopt.sweep_grid import apply_sweep_sets, expand_grid

    path = Path(path)
    raw = read_toml(path)
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(
                key, raw[key], f"a sweep key ({', '.join(_KEYS)}){did_you_mean(key, _KEYS)}"
            )
    raw, sets = apply_sweep_sets(raw, sets)
    if "grid" in raw:
        raw["settings"] = expand_grid(raw.pop("grid"), raw.get("settings"))
    raw = _quick(raw, apply=quick)
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
    seeds = check_seeds(raw.get("seeds", [0]), "seeds")
    target = raw.get("target_accuracy")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1
    ):
        raise ConfigError("target_accuracy", target, "a number in (0, 1]")
    columns = raw.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise ConfigError("columns", columns, 'a list of metric names, e.g. ["epsilon_max"]')
    diagnose = raw.get("diagnose", [])
    if not isinstance(diagnose, list) or not all(isinstance(c, str) and c for c in diagnose):
        raise ConfigError("diagnose", diagnose, 'a list of metric names, e.g. ["lr_global"]')
    paper = raw.get("paper", "")
    if not isinstance(paper, str):
        raise ConfigError("paper", paper, "the paper the sweep reproduces, as a string")
    name = raw.get("name", path.stem)
    strategies = _variants(raw.get("strategies"), "strategies")
    settings = _variants(raw.get("settings"), "settings")
    labels = [v.label for v in strategies]
    sweep = Sweep(
        name=name,
        base=base,
        strategies=strategies,
        settings=settings,
        seeds=tuple(seeds),
        target=float(target) if target is not None else None,
        columns=tuple(columns),
        paper=paper,
        claims=parse_claims(
            raw.get("expect"), strategies=labels, settings=[v.label for v in settings]
        ),
        diagnose=tuple(diagnose),
        tune=parse_tune(raw.get("tune"), strategies=labels, seeds=seeds),
    )
    sweep.cells()
    sweep.tuning_cells()
    return sweep


def run_sweep(
    sweep: Sweep,
    *,
    out: Path = Path("runs"),
    ray_address: str | None = None,
    on_cell: Callable[[int, CellResult], None] | None = None,
    resume: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run every cell in one federation, then write the comparison table and overlay plots.

    A sweep with a ``[tune]`` grid runs the grid first (under ``tuning/``), writes
    ``tuning.md`` and runs each (strategy, setting) pair at its chosen value.
    ``resume`` continues the sweep directory of an interrupted run of the same
    sweep: finished cells are read back, the others continue or rerun
    (:mod:`fedopt.sweep_resume`).
    """
    from fedopt.repro_report import sweep_digest
    from fedopt.sweep_resume import plan_cells, sweep_dir

    out_dir = sweep_dir(sweep.name, sweep_digest(sweep), out=Path(out), resume=resume)
    chosen = _run_tuning(sweep, out_dir, ray_address, resume is not None) if sweep.tune else None
    cells = sweep.cells(chosen)
    dirs = [
        out_dir / "cells" / _slug(setting.label) / _slug(strategy.label) / f"seed{seed}"
        for strategy, setting, seed, _ in cells
    ]
    scenarios = _address([sc for *_, sc in cells], ray_address)
    plan = plan_cells(dirs, scenarios, resume=resume is not None, diverged_ok=False)
    results: dict[int, CellResult] = {}

    def done(i: int, res: Any) -> None:
        strategy, setting, seed, _ = cells[i]
        results[i] = cell = CellResult(
            strategy=strategy.label,
            setting=setting.label,
            seed=seed,
            rows=tuple(res.rows),
            summary=res.summary,
            run_dir=str(res.run_dir),
        )
        if on_cell is not None:
            on_cell(i + 1, cell)

    for i, res in plan.done.items():
        done(i, res)
    if plan.todo:
        run_batch(
            [scenarios[i] for i in plan.todo],
            [dirs[i] for i in plan.todo],
            on_done=lambda j, res: done(plan.todo[j], res),
            # a diverged cell is a result (its rows up to the stop), not the end of the sweep
            on_diverged=lambda j, err: done(plan.todo[j], load_result(dirs[plan.todo[j]])),
            restore=plan.restore,
            before=plan.before,
        )
    ordered = [results[i] for i in sorted(results)]
    paths = write_compare(
        ordered, out_dir, target=sweep.target, title=sweep.name, columns=sweep.columns
    )
    paths["plots"] = [*paths["plots"], *_across(sweep, ordered, out_dir)]
    if chosen is not None:
        paths["tuning"] = out_dir / "tuning.md"
    return out_dir, paths


def swept_axis(sweep: Sweep) -> tuple[str, dict[str, float]] | None:
    """The one numeric scenario key the settings vary, with each setting's value, if there is one.

    ``partition.alpha`` across ``alpha=0.05`` / ``0.5`` / ``100`` settings, say;
    None when no key or more than one key varies numerically.
    """
    from fedopt.resume import flatten

    if len(sweep.settings) < 2:
        return None
    flat = [flatten(s.overrides) for s in sweep.settings]
    keys = set().union(*flat)
    varying = []
    for key in sorted(keys):
        got = [f.get(key) for f in flat]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got)
        if numeric and len(set(got)) > 1:
            varying.append(key)
    if len(varying) != 1:
        return None
    key = varying[0]
    return key, {s.label: float(f[key]) for s, f in zip(sweep.settings, flat, strict=True)}


def _across(sweep: Sweep, cells: Sequence[CellResult], out_dir: Path) -> list[Path]:
    """Final (and worst-10%) accuracy against the swept setting value, one line per strategy."""
    from fedopt.claims import cell_metric
    from fedopt.plots import plot_across

    axis = swept_axis(sweep)
    if axis is None:
        return []
    key, at = axis
    written = []
    for metric in ("final_accuracy", "fed_accuracy_worst10"):
        values: dict[str, dict[float, list[float]]] = {}
        for c in cells:
            got = cell_metric(c.rows, c.summary, metric, target=sweep.target)
            if got is not None:
                values.setdefault(c.strategy, {}).setdefault(at[c.setting], []).append(got)
        if values:
            written.append(plot_across(values, out_dir, title=sweep.name, key=key, metric=metric))
    return written


def _address(scenarios: list[Scenario], ray_address: str | None) -> list[Scenario]:
    if not ray_address:
        return scenarios
    return [sc.replace(**{"run.ray_address": ray_address}) for sc in scenarios]


def _run_tuning(
    sweep: Sweep, out_dir: Path, ray_address: str | None, resume: bool
) -> dict[tuple[str, str], Any]:
    """Run the ``[tune]`` grid, write ``tuning.md`` and return the chosen values."""
    from fedopt.claims import cell_metric
    from fedopt.report import write_text_atomic
    from fedopt.sweep_resume import plan_cells
    from fedopt.tuning import choose, format_tuning

    assert sweep.tune is not None
    grid = sweep.tuning_cells()
    dirs = [
        out_dir / "tuning" / _slug(setting.label) / _slug(strategy.label) / f"{value}-seed{seed}"
        for strategy, setting, value, seed, _ in grid
    ]
    outcome: dict[int, float | None] = {}

    def done(i: int, res: Any) -> None:
        outcome[i] = cell_metric(res.rows, res.summary, sweep.tune.metric, target=sweep.target)

    def diverged(i: int, err: Exception | None = None) -> None:
        outcome[i] = None

    scenarios = _address([sc for *_, sc in grid], ray_address)
    plan = plan_cells(dirs, scenarios, resume=resume, diverged_ok=True)
    for i, res in plan.done.items():
        done(i, res)
    for i in plan.diverged:
        diverged(i)
    if plan.todo:
        run_batch(
            [scenarios[i] for i in plan.todo],
            [dirs[i] for i in plan.todo],
            on_done=lambda j, res: done(plan.todo[j], res),
            on_diverged=lambda j, err: diverged(plan.todo[j], err),
            restore=plan.restore,
            before=plan.before,
        )
    got: dict[tuple[str, str, Any], list[float | None]] = {}
    for i in sorted(outcome):  # grid order, as an uninterrupted grid records them
        strategy, setting, value, _, _ = grid[i]
        got.setdefault((strategy.label, setting.label, value), []).append(outcome[i])
    chosen = choose(sweep.tune, got)
    write_text_atomic(out_dir / "tuning.md", format_tuning(sweep.tune, got, chosen) + "\n")
    return chosen


def _slug(text: str) -> str:
    from fedopt.plots import slug

    return slug(text)
