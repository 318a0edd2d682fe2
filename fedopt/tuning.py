"""A sweep's per-scheme rate grid (``[tune]``): tuning cells, the choice, and its record.

Papers tune each scheme's local rate on a grid before comparing schemes (the
FedFix code runs lr_l over 1e-5...5e-2 for every scheme). A sweep says so::

    [tune]
    key = "client.lr"                 # a dotted scenario key
    values = [0.003, 0.01, 0.03, 0.1]
    metric = "final_accuracy"         # any metric of fedopt.claims.cell_metric
    seeds = [100]                     # tuning seeds, kept apart from the sweep's seeds
    strategies = ["async FedAvg"]     # default: every strategy

Every (strategy, setting) pair is run at every value on the tuning seeds; the
value with the best mean metric is then used for that pair's evaluation seeds.
The whole grid and the choice are written to ``tuning.md`` beside the
comparison, so the tuning is part of the result, not hidden before it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedopt.claims import higher_is_better
from fedopt.errors import ConfigError, did_you_mean

__all__ = ["Tune", "check_seeds", "choose", "dotted", "format_tuning", "parse_tune"]

_FIELDS = ("key", "values", "metric", "seeds", "strategies", "direction")


@dataclass(frozen=True)
class Tune:
    """A validated ``[tune]`` table (see the module docstring)."""

    key: str
    values: tuple[Any, ...]
    metric: str
    seeds: tuple[int, ...]
    strategies: tuple[str, ...]
    higher_is_better: bool


def dotted(key: str, value: Any) -> dict[str, Any]:
    """``"client.lr", 0.1`` -> ``{"client": {"lr": 0.1}}``."""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def check_seeds(seeds: Any, key: str) -> list[int]:
    """``seeds`` as a list of distinct integers >= 0, or a ConfigError naming ``key``."""
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(key, seeds, "a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(key, seeds, "distinct seeds")
    return seeds


def parse_tune(raw: Any, *, strategies: Sequence[str], seeds: Sequence[int]) -> Tune | None:
    """Validate a sweep's ``[tune]`` table (None when the sweep has none).

    Raises
    ------
    ConfigError
        An unknown field, an empty grid, a tuning seed that is also an evaluation
        seed, or an unknown strategy label.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("tune", raw, "a table ([tune]) with key and values")
    for field in raw:
        if field not in _FIELDS:
            raise ConfigError(f"tune.{field}", raw[field], f"one of {', '.join(_FIELDS)}")
    key = raw.get("key")
    if not isinstance(key, str) or "." not in key or any(not p for p in key.split(".")):
        raise ConfigError("tune.key", key, 'a dotted scenario key, e.g. "client.lr"')
    values = raw.get("values")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError("tune.values", values, "a list of two or more values to try")
    tseeds = check_seeds(raw.get("seeds", [1000]), "tune.seeds")
    if set(tseeds) & set(seeds):
        shared = sorted(set(tseeds) & set(seeds))
        raise ConfigError("tune.seeds", tseeds, f"seeds apart from the sweep's (shared: {shared})")
    names = raw.get("strategies", list(strategies))
    if not isinstance(names, list) or not names:
        raise ConfigError("tune.strategies", names, "a non-empty list of strategy labels")
    for label in names:
        if label not in strategies:
            hint = did_you_mean(str(label), strategies)
            raise ConfigError("tune.strategies", label, f"a strategy label of the sweep{hint}")
    metric = raw.get("metric", "final_accuracy")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("tune.metric", metric, "a metric name")
    return Tune(
        key=key,
        values=tuple(values),
        metric=metric,
        seeds=tuple(tseeds),
        strategies=tuple(names),
        higher_is_better=higher_is_better(metric, raw.get("direction")),
    )


def _score(values: Sequence[float | None], higher: bool) -> float:
    nums = [v for v in values if v is not None and math.isfinite(v)]
    if not nums or len(nums) < len(values):  # one diverged seed sinks the value
        return -math.inf
    mean = statistics.fmean(nums)
    return mean if higher else -mean


def choose(
    tune: Tune, results: Mapping[tuple[str, str, Any], Sequence[float | None]]
) -> dict[tuple[str, str], Any]:
    """The best value per (strategy, setting); ties go to the earlier value of the grid.

    ``results[(strategy, setting, value)]`` holds the metric of each tuning seed;
    a value with a diverged run (None) on any tuning seed counts as the worst.
    """
    best: dict[tuple[str, str], tuple[float, Any]] = {}
    order = {repr(v): i for i, v in enumerate(tune.values)}
    ranked = sorted(results.items(), key=lambda kv: order.get(repr(kv[0][2]), len(order)))
    for (strategy, setting, value), got in ranked:
        score = _score(got, tune.higher_is_better)
        pair = (strategy, setting)
        if pair not in best or score > best[pair][0]:
            best[pair] = (score, value)
    return {pair: value for pair, (_, value) in best.items()}


def format_tuning(
    tune: Tune,
    results: Mapping[tuple[str, str, Any], Sequence[float | None]],
    chosen: Mapping[tuple[str, str], Any],
) -> str:
    """The grid as Markdown: one row per (setting, strategy), one column per value."""
    header = ["setting", "strategy", *(f"{tune.key}={v}" for v in tune.values), "chosen"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for strategy, setting in chosen:
        cells = [setting, strategy]
        for value in tune.values:
            got = [v for v in results.get((strategy, setting, value), ()) if v is not None]
            cells.append(f"{statistics.fmean(got):.4g}" if got else "—")
        cells.append(str(chosen[(strategy, setting)]))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, tune.seeds))
    return (
        f"Tuned {tune.key} per (setting, strategy) on seeds {seeds} by {tune.metric} "
        f"({'higher' if tune.higher_is_better else 'lower'} is better):\n\n" + "\n".join(lines)
    )
