"""A paper's claim as data (a sweep's ``[[expect]]`` rows) and its verdict from finished runs.

A sweep states what it tests::

    [[expect]]
    claim = "FedHyper-GM rescues a too-small initial rate"
    kind = "beats"              # beats | no_worse | matches | at_most | gap_grows
    better = "fedhyper-GM"      # strategy labels of the sweep
    than = "fedavg"
    metric = "final_accuracy"
    settings = ["lr=0.01"]      # default: every setting of the sweep
    margin = 0.0                # beats: the advantage it must exceed

Differences are paired by seed (two strategies with the same seed share the
partition, the initial model and the client draws), so the standard error is
that of the per-seed difference, ``std(d, ddof=1) / sqrt(n)``. The verdicts:

* ``beats``: the mean advantage exceeds ``margin`` by more than one standard
  error (with one seed: exceeds ``margin``);
* ``no_worse``: the mean advantage is at least ``-tolerance``;
* ``matches``: the mean difference lies within ``±tolerance``;
* ``at_most``: ``better``'s mean is at most ``value`` (no ``than``);
* ``gap_grows``: the advantage at ``settings[0]`` exceeds the advantage at
  ``settings[-1]`` by more than one standard error.

A metric's direction is higher-is-better for accuracies and lower-is-better
for losses, rounds, times and bytes (:data:`LOWER_IS_BETTER`); ``direction``
overrides it. Every verdict carries the numbers it was decided on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedopt.errors import ConfigError, did_you_mean

__all__ = [
    "CLAIM_KINDS",
    "LOWER_IS_BETTER",
    "Claim",
    "Verdict",
    "cell_metric",
    "higher_is_better",
    "judge",
    "parse_claims",
]

CLAIM_KINDS = ("beats", "no_worse", "matches", "at_most", "gap_grows")
#: Metrics (or metric name suffixes) where a smaller value is the better one.
LOWER_IS_BETTER = ("loss", "perplexity", "rounds_to_target", "time", "bytes", "_std", "staleness")
_FIELDS = (
    "claim",
    "kind",
    "better",
    "than",
    "metric",
    "settings",
    "margin",
    "tolerance",
    "value",
    "direction",
)


@dataclass(frozen=True)
class Claim:
    """One row of a sweep's ``[[expect]]`` table (see the module docstring)."""

    claim: str
    kind: str
    better: str
    than: str | None
    metric: str
    settings: tuple[str, ...]
    margin: float = 0.0
    tolerance: float = 0.0
    value: float | None = None
    higher_is_better: bool = True


@dataclass(frozen=True)
class Verdict:
    """A claim decided on finished runs.

    Attributes
    ----------
    claim : Claim
        What was tested.
    holds : bool
        Whether the runs support it (by the rule of ``claim.kind``).
    estimate : float
        The decisive number: the mean advantage of ``better`` over ``than`` in the
        metric's good direction (``at_most``: ``better``'s mean; ``gap_grows``:
        the advantage's growth).
    stderr : float or None
        Its standard error over seeds (None with one seed).
    seeds : int
        Seeds the estimate rests on.
    detail : str
        One line with the numbers, for the report.
    """

    claim: Claim
    holds: bool
    estimate: float
    stderr: float | None
    seeds: int
    detail: str

    @property
    def word(self) -> str:
        return "holds" if self.holds else "does not hold"


def higher_is_better(metric: str, raw: Any = None) -> bool:
    """Whether a larger ``metric`` is better: ``raw`` ("higher"/"lower") or by its name."""
    if raw is None:
        return not any(part in metric for part in LOWER_IS_BETTER)
    if raw not in ("higher", "lower"):
        raise ConfigError("expect.direction", raw, '"higher" or "lower"')
    return raw == "higher"


def _number(raw: Any, key: str, default: float | None) -> float | None:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(key, raw, "a finite number")
    return float(raw)


def parse_claims(
    raw: Any, *, strategies: Sequence[str], settings: Sequence[str]
) -> tuple[Claim, ...]:
    """Validate a sweep's ``expect`` array against its strategy and setting labels.

    Raises
    ------
    ConfigError
        A row names an unknown key, kind, strategy or setting, or lacks a field its kind needs.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) for r in raw):
        raise ConfigError("expect", raw, "an array of tables ([[expect]])")
    out = []
    for i, row in enumerate(raw):
        at = f"expect[{i}]"
        for key in row:
            if key not in _FIELDS:
                raise ConfigError(f"{at}.{key}", row[key], f"one of {', '.join(_FIELDS)}")
        kind = row.get("kind", "beats")
        if kind not in CLAIM_KINDS:
            raise ConfigError(f"{at}.kind", kind, f"one of {', '.join(CLAIM_KINDS)}")
        names = [("better", row.get("better"))]
        if kind != "at_most":
            names.append(("than", row.get("than")))
        for field, label in names:
            if label not in strategies:
                hint = did_you_mean(str(label), strategies)
                raise ConfigError(f"{at}.{field}", label, f"a strategy label of the sweep{hint}")
        wanted = row.get("settings", list(settings))
        if not isinstance(wanted, list) or not wanted:
            raise ConfigError(f"{at}.settings", wanted, "a non-empty list of setting labels")
        for label in wanted:
            if label not in settings:
                hint = did_you_mean(str(label), settings)
                raise ConfigError(f"{at}.settings", label, f"a setting label of the sweep{hint}")
        if kind == "gap_grows" and len(wanted) < 2:
            raise ConfigError(f"{at}.settings", wanted, "two or more settings (gap_grows)")
        metric = row.get("metric", "final_accuracy")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{at}.metric", metric, "a metric name")
        value = _number(row.get("value"), f"{at}.value", None)
        if kind == "at_most" and value is None:
            raise ConfigError(f"{at}.value", None, "the bound an at_most claim compares with")
        text = row.get("claim")
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{at}.claim", text, "a sentence saying what is claimed")
        out.append(
            Claim(
                claim=text,
                kind=kind,
                better=row["better"],
                than=row.get("than") if kind != "at_most" else None,
                metric=metric,
                settings=tuple(wanted),
                margin=_number(row.get("margin"), f"{at}.margin", 0.0) or 0.0,
                tolerance=abs(_number(row.get("tolerance"), f"{at}.tolerance", 0.0) or 0.0),
                value=value,
                higher_is_better=higher_is_better(metric, row.get("direction")),
            )
        )
    return tuple(out)


def cell_metric(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    metric: str,
    *,
    target: float | None,
) -> float | None:
    """One run's value of ``metric``.

    Summary keys (``final_accuracy``, ``bytes_total``, ...) come from the summary;
    ``bytes_per_round`` is ``bytes_total / rounds``; ``bytes_per_client_round``
    the training traffic of the rounds (down and up) over the clients they
    trained; ``rounds_to_target`` and
    ``sim_time_to_target`` need the sweep's ``target_accuracy`` and, for a run that
    never reached it, are the run's whole length (a censored value: the true one is
    larger); any other name is the last value the key took in the rows.
    """
    from fedopt.report import summarize
    from fedopt.tables import final_value, rounds_to_target, time_to_target

    full = {**summarize(rows), **summary}
    if metric in ("rounds_to_target", "sim_time_to_target"):
        if target is None:
            raise ConfigError("expect.metric", metric, "a sweep with target_accuracy")
        if metric == "rounds_to_target":
            got = rounds_to_target(rows, target=target)
            return float(got if got is not None else full.get("rounds") or len(rows))
        got_t = time_to_target(rows, target=target)
        return got_t if got_t is not None else _as_float(full.get("sim_time"))
    if metric == "bytes_per_client_round":
        moved = sum(_as_float(r.get("bytes_down")) or 0.0 for r in rows)
        moved += sum(_as_float(r.get("bytes_up")) or 0.0 for r in rows)
        replies = sum(_as_float(r.get("num_clients")) or 0.0 for r in rows)
        return moved / replies if replies else None
    if metric == "bytes_per_round":
        total, rounds = _as_float(full.get("bytes_total")), _as_float(full.get("rounds"))
        return None if total is None or not rounds else total / rounds
    if metric in full and _as_float(full[metric]) is not None:
        return _as_float(full[metric])
    return final_value(rows, metric)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


Lookup = Callable[[str, str], Mapping[int, float]]


def _paired(a: Mapping[int, float], b: Mapping[int, float], sign: float) -> dict[int, float]:
    """Per-seed advantage of ``a`` over ``b`` in the metric's good direction."""
    return {s: sign * (a[s] - b[s]) for s in sorted(a) if s in b}


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def _fmt(mean: float, se: float | None) -> str:
    return f"{mean:+.4g}" + ("" if se is None else f" ± {se:.2g} SE")


def judge(claim: Claim, values: Lookup) -> list[Verdict]:
    """Decide ``claim``; ``values(strategy, setting)`` maps seed -> the run's metric.

    One verdict per setting, except ``gap_grows`` (one verdict in all).
    """
    sign = 1.0 if claim.higher_is_better else -1.0
    if claim.kind == "gap_grows":
        first, last = claim.settings[0], claim.settings[-1]
        gaps = {
            setting: _paired(values(claim.better, setting), values(claim.than or "", setting), sign)
            for setting in (first, last)
        }
        growth = [gaps[first][s] - gaps[last][s] for s in sorted(gaps[first]) if s in gaps[last]]
        if not growth:
            return [_missing(claim, f"{first} vs {last}")]
        mean, se = _mean_se(growth)
        g0, _ = _mean_se(list(gaps[first].values()))
        g1, _ = _mean_se(list(gaps[last].values()))
        holds = mean > (se or 0.0)
        detail = f"advantage {g0:+.4g} at {first}, {g1:+.4g} at {last}; growth {_fmt(mean, se)}"
        return [Verdict(claim, holds, mean, se, len(growth), detail)]
    out = []
    for setting in claim.settings:
        mine = values(claim.better, setting)
        if claim.kind == "at_most":
            if not mine:
                out.append(_missing(claim, setting))
                continue
            mean, se = _mean_se(list(mine.values()))
            holds = mean <= (claim.value or 0.0)
            detail = f"{setting}: {claim.better} {_fmt(mean, se)} against at most {claim.value:g}"
            out.append(Verdict(claim, holds, mean, se, len(mine), detail))
            continue
        diffs = list(_paired(mine, values(claim.than or "", setting), sign).values())
        if not diffs:
            out.append(_missing(claim, setting))
            continue
        mean, se = _mean_se(diffs)
        if claim.kind == "beats":
            holds = mean - claim.margin > (se or 0.0)
            rule = f"needs > {claim.margin:g} by one SE"
        elif claim.kind == "no_worse":
            holds = mean >= -claim.tolerance
            rule = f"needs ≥ -{claim.tolerance:g}"
        else:
            holds = abs(mean) <= claim.tolerance
            rule = f"needs within ±{claim.tolerance:g}"
        detail = f"{setting}: {claim.better} over {claim.than} {_fmt(mean, se)} ({rule})"
        out.append(Verdict(claim, holds, mean, se, len(diffs), detail))
    return out


def _missing(claim: Claim, where: str) -> Verdict:
    return Verdict(claim, False, math.nan, None, 0, f"{where}: no finished runs to compare")
