"""The reproduction suite: run every sweep of ``scenarios/papers/``, judge its claims, report.

``fedopt reproduce`` (``make reproduce``) runs each paper sweep in turn, decides
every ``[[expect]]`` claim of it on the finished runs (:mod:`fedopt.claims`)
and writes one Markdown report: per sweep the comparison table, the tuning
grid when the sweep has one, one plot, each claim's verdict with its margin
and standard error, and for every claim that does not hold the sweep's
``diagnose`` metrics per strategy, measured on the same runs. ``--quick``
runs each sweep's quick tier (its ``[quick]`` table), the smoke test CI runs.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedopt.claims import Verdict, cell_metric, judge
from fedopt.compare import Sweep, load_sweep, run_sweep
from fedopt.errors import ConfigError
from fedopt.report import write_text_atomic
from fedopt.tables import CellResult

__all__ = ["PAPERS_DIR", "SweepReport", "find_sweeps", "judge_sweep", "render", "reproduce"]

PAPERS_DIR = Path(__file__).resolve().parent.parent / "scenarios" / "papers"


@dataclass(frozen=True)
class SweepReport:
    """One sweep's outcome: where it ran, its table and tuning record, its verdicts."""

    sweep: Sweep
    out_dir: Path
    table: str
    tuning: str
    plot: Path | None
    verdicts: tuple[Verdict, ...]
    diagnosis: str
    wall_s: float


def find_sweeps(folder: Path = PAPERS_DIR, only: Sequence[str] = ()) -> list[Path]:
    """The sweep files of ``folder`` (sorted), or those named in ``only`` (by file stem)."""
    paths = sorted(Path(folder).glob("*.toml"))
    if not paths:
        raise ConfigError("papers", str(folder), "a folder with sweep files (*.toml)")
    stems = [p.stem for p in paths]
    for name in only:
        if name not in stems:
            raise ConfigError("--only", name, f"one of {', '.join(stems)}")
    return [p for p in paths if not only or p.stem in only]


def _values(sweep: Sweep, cells: Sequence[CellResult], metric: str) -> Callable:
    table: dict[tuple[str, str], dict[int, float]] = {}
    for cell in cells:
        got = cell_metric(cell.rows, cell.summary, metric, target=sweep.target)
        if got is not None:
            table.setdefault((cell.strategy, cell.setting), {})[cell.seed] = got
    return lambda strategy, setting: table.get((strategy, setting), {})


def judge_sweep(sweep: Sweep, cells: Sequence[CellResult]) -> list[Verdict]:
    """Every claim of ``sweep`` decided on its finished ``cells``."""
    out: list[Verdict] = []
    for claim in sweep.claims:
        out.extend(judge(claim, _values(sweep, cells, claim.metric)))
    return out


def diagnose(sweep: Sweep, cells: Sequence[CellResult]) -> str:
    """The sweep's ``diagnose`` metrics per (setting, strategy): final value, mean ± std."""
    if not sweep.diagnose:
        return ""
    header = ["setting", "strategy", *sweep.diagnose]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lookups = {m: _values(sweep, cells, m) for m in sweep.diagnose}
    for setting in sweep.settings:
        for strategy in sweep.strategies:
            row = [setting.label, strategy.label]
            for metric in sweep.diagnose:
                got = list(lookups[metric](strategy.label, setting.label).values())
                if not got:
                    row.append("—")
                    continue
                std = statistics.pstdev(got) if len(got) > 1 else 0.0
                row.append(f"{statistics.fmean(got):.4g} ± {std:.2g}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def reproduce(
    paths: Sequence[Path],
    *,
    quick: bool = False,
    out: Path = Path("runs"),
    report: Path | None = None,
    on_sweep: Callable[[SweepReport], None] | None = None,
) -> list[SweepReport]:
    """Run each sweep (validated all before the first starts), judge it, write ``report``.

    Plots are copied next to the report (``<report stem>/<sweep>.png``) so the
    report stays readable where it is committed.
    """
    import time

    sweeps = [load_sweep(p, quick=quick) for p in paths]
    out_reports = []
    for sweep in sweeps:
        cells: list[CellResult] = []
        start = time.monotonic()
        out_dir, files = run_sweep(sweep, out=out, on_cell=lambda _i, c, got=cells: got.append(c))
        pngs = files.get("plots") or []
        plot = Path(pngs[0]) if pngs else None
        tuning = Path(files["tuning"]).read_text() if "tuning" in files else ""
        table = Path(files["markdown"]).read_text().split("\n\n![")[0]
        table = table.split("\n", 2)[-1].strip()  # drop the "# name" title
        result = SweepReport(
            sweep=sweep,
            out_dir=out_dir,
            table=table,
            tuning=tuning,
            plot=plot,
            verdicts=tuple(judge_sweep(sweep, cells)),
            diagnosis=diagnose(sweep, cells),
            wall_s=time.monotonic() - start,
        )
        out_reports.append(result)
        if on_sweep is not None:
            on_sweep(result)
        if report is not None:  # rewritten after every sweep: an interrupted suite keeps its part
            write_text_atomic(report, render(out_reports, quick=quick, report=report))
    return out_reports


def _copy_plot(result: SweepReport, report: Path) -> str:
    if result.plot is None or not result.plot.exists():
        return ""
    folder = report.parent / report.stem
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{result.sweep.name}.png"
    shutil.copyfile(result.plot, target)
    return f"![{result.sweep.name}]({report.stem}/{target.name})\n\n"


def render(results: Sequence[SweepReport], *, quick: bool, report: Path) -> str:
    """The Markdown report: a verdict summary, then one section per sweep."""
    held = sum(all(v.holds for v in r.verdicts) for r in results if r.verdicts)
    judged = sum(bool(r.verdicts) for r in results)
    tier = "quick tier: 1 seed, few rounds, a smoke test, not evidence" if quick else "full tier"
    minutes = sum(r.wall_s for r in results) / 60
    lines = [
        "# Reproductions",
        "",
        f"Written by `fedopt reproduce` ({tier}); {len(results)} sweeps in "
        f"{minutes:.1f} minutes of wall time. A claim holds when its rule in "
        "`fedopt/claims.py` is met by the mean paired (same-seed) difference and its "
        "standard error.",
        "",
        f"**{held} of {judged} sweeps: every claim holds.**",
        "",
        "| sweep | paper | claim | verdict | where and by how much |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for v in r.verdicts:
            lines.append(
                f"| {r.sweep.name} | {r.sweep.paper} | {v.claim.claim} | "
                f"**{v.word}** | {v.detail} |"
            )
    lines.append("")
    for r in results:
        lines += [f"## {r.sweep.name}", ""]
        if r.sweep.paper:
            lines += [f"Paper: {r.sweep.paper}. Seeds: {', '.join(map(str, r.sweep.seeds))}.", ""]
        lines += [f"Run directory: `{r.out_dir}` ({r.wall_s / 60:.1f} min).", "", r.table, ""]
        if r.tuning:
            lines += [r.tuning.strip(), ""]
        lines.append(_copy_plot(r, report).rstrip("\n"))
        lines.append("")
        for v in r.verdicts:
            lines.append(f"- {v.claim.claim}: **{v.word}**; {v.detail}")
        lines.append("")
        if r.diagnosis and not all(v.holds for v in r.verdicts):
            lines += ["Measured for the claims that do not hold (final values):", "", r.diagnosis]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
