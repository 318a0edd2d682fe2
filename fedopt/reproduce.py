"""The reproduction suite: run every sweep of ``scenarios/papers/``, judge its claims, report.

``fedopt reproduce`` (``make reproduce``) runs each paper sweep in turn, decides
every ``[[expect]]`` claim of it on the finished runs (:mod:`fedopt.claims`)
and writes one Markdown report: per sweep the comparison table, the tuning
grid when the sweep has one, one plot, each claim's verdict with its margin
and standard error, and for every claim that does not hold the sweep's
``diagnose`` metrics per strategy, measured on the same runs. ``--quick``
runs each sweep's quick tier (its ``[quick]`` table), the smoke test CI runs.

Each sweep's section is also stored as JSON next to the report
(``<report stem>/<name>.json``, with the plot), stamped with when, at which
commit and on which sweep definition it was measured. ``--only`` reruns some
sweeps and the report is rebuilt from every stored section of the same tier,
so one method's sweep can be remeasured without the whole suite; a section
whose sweep definition changed since it was measured is marked stale.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fedopt.claims import Verdict, cell_metric, judge
from fedopt.compare import Sweep, load_sweep, run_sweep
from fedopt.errors import ConfigError
from fedopt.report import write_json_atomic, write_text_atomic
from fedopt.repro_report import (
    load_sections,
    render,
    section_of,
    source_commit,
    sweep_digest,
)
from fedopt.tables import CellResult

__all__ = ["PAPERS_DIR", "SweepReport", "find_sweeps", "judge_sweep", "rebuild", "reproduce"]

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


def _current(folder: Path, quick: bool, loaded: Mapping[Path, Sweep] | None = None) -> dict:
    """Every sweep of ``folder`` by name, with the digest of its definition now.

    Sweeps already in ``loaded`` (by path) are not read and validated again.
    """
    loaded = loaded or {}
    out = {}
    for p in find_sweeps(folder):
        sw = loaded.get(p) or load_sweep(p, quick=quick)
        out[sw.name] = sweep_digest(sw)
    return out


def rebuild(folder: Path, report: Path, *, quick: bool = False) -> int:
    """Rewrite ``report`` from its stored sections, running nothing; return how many it holds."""
    current = _current(folder, quick)
    stored = load_sections(report.parent / report.stem, quick=quick)
    kept = [stored[name] for name in sorted(current) if name in stored]
    write_text_atomic(report, render(kept, quick=quick, current=current, images=report.stem))
    return len(kept)


def reproduce(
    paths: Sequence[Path],
    *,
    quick: bool = False,
    out: Path = Path("runs"),
    report: Path | None = None,
    on_sweep: Callable[[SweepReport], None] | None = None,
) -> list[SweepReport]:
    """Run each sweep (validated all before the first starts), judge it, write ``report``.

    Each finished sweep's section is stored as ``<report stem>/<name>.json``
    (with its plot) and the report is rebuilt from every stored section of
    the same tier whose sweep is still in the suite (``find_sweeps()`` of the
    folder of ``paths``), so sweeps not rerun keep their last measurement.
    """
    sweeps = [load_sweep(p, quick=quick) for p in paths]
    current = {}
    if report is not None and paths:
        loaded = dict(zip(map(Path, paths), sweeps, strict=True))
        current = _current(Path(paths[0]).parent, quick, loaded)
    commit = source_commit()  # before anything is written: the report is a tracked file
    out_reports = []
    for sweep in sweeps:
        cells: list[CellResult] = []
        start = time.monotonic()
        out_dir, files = run_sweep(sweep, out=out, on_cell=lambda _i, c, got=cells: got.append(c))
        pngs = files.get("plots") or []
        tuning = Path(files["tuning"]).read_text() if "tuning" in files else ""
        table = Path(files["markdown"]).read_text().split("\n\n![")[0]
        table = table.split("\n", 2)[-1].strip()  # drop the "# name" title
        result = SweepReport(
            sweep=sweep,
            out_dir=out_dir,
            table=table,
            tuning=tuning,
            plot=Path(pngs[0]) if pngs else None,
            verdicts=tuple(judge_sweep(sweep, cells)),
            diagnosis=diagnose(sweep, cells),
            wall_s=time.monotonic() - start,
        )
        out_reports.append(result)
        if on_sweep is not None:
            on_sweep(result)
        if report is not None:  # rebuilt after every sweep: an interrupted suite keeps its part
            folder = report.parent / report.stem
            section = section_of(result, quick=quick, folder=folder, commit=commit)
            write_json_atomic(folder / f"{section.name}.json", asdict(section))
            stored = load_sections(folder, quick=quick)
            kept = [stored[name] for name in sorted(current) if name in stored]
            write_text_atomic(
                report, render(kept, quick=quick, current=current, images=report.stem)
            )
    return out_reports
