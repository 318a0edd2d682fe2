"""The strategy comparison table of ``fedopt compare``: aggregates over seeds, Markdown, CSV.

Each finished run is one :class:`CellResult` (a strategy variant, a
heterogeneity setting and a seed). :func:`compare_rows` averages the seeds of
every (setting, strategy) pair, :func:`format_markdown` renders the table and
:func:`write_compare` writes ``comparison.md``, ``comparison.csv`` and the
overlay plots.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedopt import plots
from fedopt.errors import ConfigError
from fedopt.report import accuracy_key, jsonable, summarize, write_text_atomic

__all__ = [
    "COMPARE_COLUMNS",
    "CellResult",
    "compare_rows",
    "format_markdown",
    "rounds_to_target",
    "time_to_target",
    "write_compare",
]

COMPARE_COLUMNS = (
    "setting",
    "strategy",
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "rounds_to_target_mean",
    "reached",
    "sim_time_to_target_mean",
    "bytes_total_mean",
    "sim_time_mean",
)
_DASH = "—"


@dataclass(frozen=True)
class CellResult:
    """One finished run of the comparison grid.

    Attributes
    ----------
    strategy : str
        Strategy variant label.
    setting : str
        Heterogeneity setting label.
    seed : int
        The run's seed.
    rows : tuple of Mapping
        The run's per-round metric rows.
    summary : Mapping
        The run's summary (see :func:`fedopt.report.summarize`); keys it lacks
        are computed from ``rows``.
    run_dir : str
        Where the run's files are, for reference.
    """

    strategy: str
    setting: str
    seed: int
    rows: tuple[Mapping[str, Any], ...]
    summary: Mapping[str, Any]
    run_dir: str = ""


def _first_reaching(rows: Sequence[Mapping[str, Any]], target: float) -> Mapping | None:
    """The first row whose accuracy is at least ``target``."""
    key = accuracy_key(rows)
    for row in rows if key else ():
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= target:
            return row
    return None


def rounds_to_target(rows: Sequence[Mapping[str, Any]], *, target: float) -> int | None:
    """The first round whose accuracy is at least ``target``; ``None`` if never reached."""
    row = _first_reaching(rows, target)
    return None if row is None else int(row["round"])


def time_to_target(rows: Sequence[Mapping[str, Any]], *, target: float) -> float | None:
    """The ``sim_time`` of the round :func:`rounds_to_target` finds; ``None`` if unreached."""
    row = _first_reaching(rows, target)
    value = None if row is None else row.get("sim_time")
    return float(value) if isinstance(value, (int, float)) else None


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(nums) if nums else None


def _std(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.pstdev(nums) if nums else None


def final_value(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The last value ``key`` took in a run (None when it never appeared)."""
    for row in reversed(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def compare_rows(
    cells: Sequence[CellResult], *, target: float | None, columns: Sequence[str] = ()
) -> list[dict]:
    """Aggregate seeds per (setting, strategy), in first-seen order.

    Each dict has the keys of :data:`COMPARE_COLUMNS`. Means and population
    standard deviations (ddof=0) run over the seeds that have the value;
    ``rounds_to_target_mean`` and ``sim_time_to_target_mean`` over the seeds
    that reached ``target`` (``None`` when none did, or when ``target`` is
    ``None``, which also makes ``reached`` ``None``). For each extra row key in
    ``columns`` (e.g. ``epsilon_max``), ``<key>_mean`` and ``<key>_std`` of its
    final value over the seeds.

    Raises
    ------
    ConfigError
        ``target`` is not a fraction between 0 and 1.
    """
    ok = isinstance(target, (int, float)) and not isinstance(target, bool) and 0 <= target <= 1
    if target is not None and not ok:
        raise ConfigError("target", target, "an accuracy fraction between 0 and 1")
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.setting, cell.strategy), []).append(cell)
    out = []
    for (setting, strategy), group in groups.items():
        sums = [{**summarize(c.rows), **c.summary} for c in group]
        finals = [s.get("final_accuracy") for s in sums]
        bests = [s.get("best_accuracy") for s in sums]
        if target is None:
            rounds: list[int | None] = []
            times: list[float | None] = []
        else:
            rounds = [rounds_to_target(c.rows, target=target) for c in group]
            times = [time_to_target(c.rows, target=target) for c in group]
        out.append(
            {
                "setting": setting,
                "strategy": strategy,
                "seeds": len(group),
                "final_acc_mean": _mean(finals),
                "final_acc_std": _std(finals),
                "best_acc_mean": _mean(bests),
                "best_acc_std": _std(bests),
                "rounds_to_target_mean": _mean(rounds),
                "reached": None if target is None else sum(r is not None for r in rounds),
                "sim_time_to_target_mean": _mean(times),
                "bytes_total_mean": _mean([s.get("bytes_total") for s in sums]),
                "sim_time_mean": _mean([s.get("sim_time") for s in sums]),
            }
        )
        for key in columns:
            finals_k = [final_value(c.rows, key) for c in group]
            out[-1][f"{key}_mean"] = _mean(finals_k)
            out[-1][f"{key}_std"] = _std(finals_k)
    return out


def _pm(mean: float | None, std: float | None, n: int | None = None) -> str:
    """``mean ± std``; with one seed ``mean (n=1)``: a spread of one value is not zero."""
    if mean is None:
        return _DASH
    return f"{mean:.3f} (n=1)" if n == 1 else f"{mean:.3f} ± {std or 0.0:.3f}"


def _reach(mean: float | None, reached: int | None, seeds: int) -> str:
    if mean is None or not reached:
        return _DASH
    return f"{mean:.1f}" if reached == seeds else f"{mean:.1f} ({reached}/{seeds})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def format_markdown(rows: list[dict], *, target: float | None, columns: Sequence[str] = ()) -> str:
    """Render :func:`compare_rows` output as a Markdown table.

    Columns: setting, strategy, final acc and best acc (``mean ± std``, 3
    decimals), rounds and simulated seconds to the target (1 decimal, ``—``
    when no seed reached it, ``(k/n)`` when only k of n seeds did; both
    columns are left out when ``target`` is ``None``) and mean total traffic
    in MB (10^6 bytes, 2 decimals).
    """
    header = ["setting", "strategy", "final acc", "best acc"]
    if target is not None:
        pct = f"{target * 100:g}%"
        header += [f"rounds to {pct}", f"sim time to {pct}"]
    header.append("MB")
    header += list(columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            _cell(r["setting"]),
            _cell(r["strategy"]),
            _pm(r["final_acc_mean"], r["final_acc_std"], r["seeds"]),
            _pm(r["best_acc_mean"], r["best_acc_std"], r["seeds"]),
        ]
        if target is not None:
            cells.append(_reach(r["rounds_to_target_mean"], r["reached"], r["seeds"]))
            cells.append(_reach(r["sim_time_to_target_mean"], r["reached"], r["seeds"]))
        mb = r["bytes_total_mean"]
        cells.append(_DASH if mb is None else f"{mb / 1e6:.2f}")
        cells += [_pm(r.get(f"{k}_mean"), r.get(f"{k}_std"), r["seeds"]) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _stopped(cells: Sequence[CellResult]) -> str:
    """A line per cell that did not complete (e.g. diverged), with its status."""
    lines = [
        f"- {c.setting} / {c.strategy} / seed {c.seed}: {c.summary.get('status')}"
        for c in cells
        if c.summary.get("status", "completed") != "completed"
    ]
    if not lines:
        return ""
    head = "Stopped early (their rows up to the stop are in the table):\n\n"
    return head + "\n".join(lines) + "\n\n"


def write_compare(
    cells: Sequence[CellResult],
    out_dir: Path,
    *,
    target: float | None,
    title: str,
    columns: Sequence[str] = (),
) -> dict[str, Path | list[Path]]:
    """Write ``comparison.md``, ``comparison.csv`` and overlay plots into ``out_dir``.

    Returns
    -------
    dict
        ``{"markdown": Path, "csv": Path, "plots": [Path, ...]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = compare_rows(cells, target=target, columns=columns)
    names = (*COMPARE_COLUMNS, *(f"{k}_{m}" for k in columns for m in ("mean", "std")))
    curves: dict[str, dict[str, list]] = {}
    for cell in cells:
        curves.setdefault(cell.setting, {}).setdefault(cell.strategy, []).append(list(cell.rows))
    pngs = plots.plot_compare(curves, out_dir, title=title)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    for row in table:
        writer.writerow(["" if (v := jsonable(row[c])) is None else v for c in names])
    csv_path = write_text_atomic(out_dir / "comparison.csv", buf.getvalue())
    links = "".join(f"![{p.stem}]({p.name})\n\n" for p in pngs)
    text = f"# {title}\n\n{format_markdown(table, target=target, columns=columns)}\n"
    text += _stopped(cells) + links
    md_path = write_text_atomic(out_dir / "comparison.md", text.rstrip("\n") + "\n")
    return {"markdown": md_path, "csv": csv_path, "plots": pngs}
