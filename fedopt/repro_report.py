"""The reproduction report: stored per-sweep sections and the Markdown they render.

A sweep's section (table, tuning grid, plot, verdicts, diagnosis) is stored as
JSON beside the report, stamped with the time, the commit and a digest of the
sweep definition it was measured on, so the report can be rebuilt from every
stored section when only some sweeps are rerun, and can say which are stale.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedopt.compare import Sweep
    from fedopt.reproduce import SweepReport

__all__ = ["Section", "load_sections", "render", "section_of", "source_commit", "sweep_digest"]


def sweep_digest(sweep: Sweep) -> str:
    """A short hash of a sweep's resolved definition (base, variants, seeds, claims, tiers)."""
    return hashlib.sha256(repr(sweep).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Section:
    """One sweep's stored report section, rebuilt into the report without rerunning it.

    ``verdicts`` holds ``(claim, holds, detail)`` triples; ``plot`` is the file
    name of the copied plot in the report's folder ("" for none); ``digest`` is
    :func:`sweep_digest` of the definition measured, ``commit`` the source
    revision ("" outside a git checkout; ``+dirty`` with uncommitted changes).
    """

    name: str
    paper: str
    seeds: tuple[int, ...]
    quick: bool
    out_dir: str
    wall_s: float
    table: str
    tuning: str
    diagnosis: str
    plot: str
    verdicts: tuple[tuple[str, bool, str], ...]
    digest: str
    measured: str
    commit: str

    @property
    def all_hold(self) -> bool:
        return all(holds for _, holds, _ in self.verdicts)

    @classmethod
    def from_json(cls, data: dict) -> Section:
        data = {**data, "seeds": tuple(data["seeds"])}
        data["verdicts"] = tuple((str(c), bool(h), str(d)) for c, h, d in data["verdicts"])
        return cls(**data)


def source_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); "" outside git.

    :func:`~fedopt.reproduce.reproduce` reads it once, before it writes the
    report (which is tracked), so its own output never marks a run dirty.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def section_of(result: SweepReport, *, quick: bool, folder: Path, commit: str) -> Section:
    """``result`` as a stored section measured at ``commit``; its plot is copied into ``folder``."""
    plot = ""
    if result.plot is not None and result.plot.exists():
        folder.mkdir(parents=True, exist_ok=True)
        plot = f"{result.sweep.name}.png"
        shutil.copyfile(result.plot, folder / plot)
    return Section(
        name=result.sweep.name,
        paper=result.sweep.paper,
        seeds=tuple(result.sweep.seeds),
        quick=quick,
        out_dir=_shown(result.out_dir),
        wall_s=float(result.wall_s),
        table=result.table,
        tuning=result.tuning,
        diagnosis=result.diagnosis,
        plot=plot,
        verdicts=tuple((v.claim.claim, bool(v.holds), v.detail) for v in result.verdicts),
        digest=sweep_digest(result.sweep),
        measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        commit=commit,
    )


def load_sections(folder: Path, *, quick: bool) -> dict[str, Section]:
    """The stored sections of one tier in ``folder``, by sweep name (unreadable files skipped)."""
    out: dict[str, Section] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            got = Section.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if got.quick == quick:
            out[got.name] = got
    return out


def render(
    sections: Sequence[Section],
    *,
    quick: bool,
    current: dict[str, str] | None = None,
    images: str = "reproductions",
) -> str:
    """The Markdown report: a verdict summary, then one section per sweep.

    ``current`` maps sweep names to :func:`sweep_digest` of their definitions
    now; a section measured on another definition is marked stale. Plots are
    linked from the folder ``images`` (the report's stem), beside the report.
    """
    current = current or {}
    stale = {s.name for s in sections if s.name in current and current[s.name] != s.digest}
    held = sum(s.all_hold for s in sections if s.verdicts)
    judged = sum(bool(s.verdicts) for s in sections)
    tier = "quick tier: 1 seed, few rounds, a smoke test, not evidence" if quick else "full tier"
    minutes = sum(s.wall_s for s in sections) / 60
    lines = [
        "# Reproductions",
        "",
        f"Written by `fedopt reproduce` ({tier}); {len(sections)} sweeps, "
        f"{minutes:.1f} minutes of wall time in all (each section says when and at which "
        "commit it was measured). A claim holds when its rule in `fedopt/claims.py` is met "
        "by the mean paired (same-seed) difference and its standard error.",
        "",
        f"**{held} of {judged} sweeps: every claim holds.**",
        "",
    ]
    rows = [(s.name, sum(h for _, h, _ in s.verdicts), len(s.verdicts)) for s in sections]
    if rows:
        per = ", ".join(f"{name} {k}/{n}" for name, k, n in rows)
        total = sum(k for _, k, _ in rows), sum(n for *_, n in rows)
        lines += [f"Claim rows that hold: {total[0]} of {total[1]} ({per}).", ""]
    if stale:
        lines += [
            f"Stale (the sweep changed since it was measured): {', '.join(sorted(stale))}.",
            "",
        ]
    lines += [
        "| sweep | paper | claim | verdict | where and by how much |",
        "|---|---|---|---|---|",
    ]
    for s in sections:
        for claim, holds, detail in s.verdicts:
            word = "holds" if holds else "does not hold"
            lines.append(f"| {s.name} | {s.paper} | {claim} | **{word}** | {detail} |")
    lines.append("")
    for s in sections:
        lines += [f"## {s.name}" + (" (stale)" if s.name in stale else ""), ""]
        if s.paper:
            lines += [f"Paper: {s.paper}. Seeds: {', '.join(map(str, s.seeds))}.", ""]
        at = f", commit {s.commit}" if s.commit else ""
        lines += [
            f"Measured {s.measured}{at}, {s.wall_s / 60:.1f} min; run directory `{s.out_dir}`.",
            "",
            s.table,
            "",
        ]
        if s.tuning:
            lines += [s.tuning.strip(), ""]
        if s.plot:
            lines += [f"![{s.name}]({images}/{s.plot})", ""]
        for claim, holds, detail in s.verdicts:
            lines.append(f"- {claim}: **{'holds' if holds else 'does not hold'}**; {detail}")
        lines.append("")
        if s.diagnosis and not s.all_hold:
            lines += ["Measured for the claims that do not hold (final values):", "", s.diagnosis]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
