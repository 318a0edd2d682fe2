"""Resuming an interrupted sweep: finished cells are read back, interrupted ones continue.

``fedopt compare SWEEP --resume DIR`` reuses the sweep directory ``DIR``. Each
cell (and each ``[tune]`` grid cell) is looked at before the federation
starts: one whose ``summary.json`` says completed, on the same scenario, is
read back as it is; one stopped mid-way continues from its newest verified
checkpoint (metrics cut back to it, as ``fedopt resume`` does); any other is
run again from a clean directory. Cells are deterministic, so the table is
the one an uninterrupted sweep writes. A directory made by a sweep whose
definition has changed since is refused (``sweep.json`` holds its digest).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedopt.checkpoint import Checkpoint, latest_checkpoint
from fedopt.config import Scenario, load_scenario
from fedopt.errors import ConfigError
from fedopt.report import METRICS_FILE, jsonable, write_json_atomic, write_text_atomic

__all__ = ["SWEEP_FILE", "CellPlan", "plan_cells", "sweep_dir"]

SWEEP_FILE = "sweep.json"


def sweep_dir(name: str, digest: str, *, out: Path, resume: Path | None) -> Path:
    """A new sweep directory under ``out``, or ``resume`` checked against ``digest``.

    Raises
    ------
    ConfigError
        ``resume`` is not a sweep directory, or one of a sweep defined otherwise.
    """
    from fedopt.simulation import make_run_dir

    if resume is None:
        path = make_run_dir(Path(out), name)
        write_json_atomic(path / SWEEP_FILE, {"name": name, "digest": digest})
        return path
    path = Path(resume).expanduser().resolve()
    try:
        stored = json.loads((path / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        allowed = f"a sweep directory (with {SWEEP_FILE})"
        raise ConfigError("--resume", str(resume), allowed) from None
    if not isinstance(stored, dict) or stored.get("digest") != digest:
        got = stored.get("digest") if isinstance(stored, dict) else stored
        raise ConfigError(
            "--resume",
            str(resume),
            f"a directory of this sweep as defined now (it was made by definition {got}, "
            f"the sweep is {digest} now: start it over without --resume)",
        )
    return path


@dataclass
class CellPlan:
    """What to do with each cell: the finished ones' results, and the rest to run."""

    done: dict[int, Any] = field(default_factory=dict)
    diverged: set[int] = field(default_factory=set)
    todo: list[int] = field(default_factory=list)
    restore: list[Checkpoint | None] = field(default_factory=list)
    before: list[Callable[[], None] | None] = field(default_factory=list)


def _clear(run_dir: Path, scenario: Scenario) -> Callable[[], None]:
    def hook() -> None:  # once the engine is up: the old, unusable files go
        for p in run_dir.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        _write_scenario(run_dir, scenario)

    return hook


def _cut(run_dir: Path, scenario: Scenario, ckpt: Checkpoint) -> Callable[[], None]:
    def hook() -> None:
        lines = [json.dumps(jsonable(r), allow_nan=False) + "\n" for r in ckpt.payload["rows"]]
        write_text_atomic(run_dir / METRICS_FILE, "".join(lines))
        _write_scenario(run_dir, scenario)

    return hook


def _write_scenario(run_dir: Path, scenario: Scenario) -> None:
    from fedopt.simulation import write_scenario

    write_scenario(run_dir, scenario)


def _status(run_dir: Path) -> str:
    try:
        got = json.loads((run_dir / "summary.json").read_text()).get("status", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return got if isinstance(got, str) else ""


def plan_cells(
    dirs: Sequence[Path], scenarios: Sequence[Scenario], *, resume: bool, diverged_ok: bool
) -> CellPlan:
    """Sort the cells of a sweep (or of its grid) into finished and still to run.

    Without ``resume`` every cell runs. A cell that stopped as diverged is
    finished (rerunning it would diverge again): with ``diverged_ok`` (a
    tuning grid) it goes to ``diverged``, otherwise its result is read back.
    """
    from fedopt.simulation import load_result

    plan = CellPlan()
    for i, (run_dir, sc) in enumerate(zip(dirs, scenarios, strict=True)):
        run_dir = Path(run_dir)
        same = False
        if resume and run_dir.is_dir():
            try:
                same = load_scenario(run_dir / "scenario.toml").fingerprint() == sc.fingerprint()
            except ConfigError:
                same = False
        status = _status(run_dir) if same else ""
        if status == "completed":
            plan.done[i] = load_result(run_dir)
            continue
        if status.startswith("failed: training diverged"):  # would diverge again
            if diverged_ok:
                plan.diverged.add(i)
            else:
                plan.done[i] = load_result(run_dir)
            continue
        ckpt = latest_checkpoint(run_dir) if same else None
        plan.todo.append(i)
        if ckpt is not None and isinstance(ckpt.payload.get("rows"), list):
            plan.restore.append(ckpt)
            plan.before.append(_cut(run_dir, sc, ckpt))
        else:
            plan.restore.append(None)
            plan.before.append(_clear(run_dir, sc) if resume and run_dir.is_dir() else None)
    return plan
