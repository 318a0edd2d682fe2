"""Continues a stopped run from its newest checkpoint: ``fedopt resume``.

A run stopped by Ctrl-C or SIGTERM (or killed outright) continues from its
newest verified checkpoint (:func:`fedopt.checkpoint.latest_checkpoint`):
``metrics.jsonl`` is cut back to the rows the checkpoint holds, the rounds
after it are recomputed, and the final ``metrics.jsonl`` is the one an
uninterrupted run writes. The scenario is the run's own ``scenario.toml``
(or another file), with ``--set`` overrides; one that differs from the
checkpoint's is refused unless forced. Every resume appends a line to
``resumes.jsonl``: when, from which round, whether forced, what changed.

Where the federation runs (``run.ray_address``) is not part of a run's
identity: changing only that needs no ``--force``.

A resume changes nothing on disk until the engine is up and the run's driver
starts (the record, the cut of ``metrics.jsonl`` and a forced scenario are
written then), so one that fails to start leaves the directory as it was. A
run whose ``scenario.toml`` is gone resumes from the scenario its checkpoint
holds; a run that already finished is reported as finished, not recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedopt.checkpoint import Checkpoint, latest_checkpoint
from fedopt.config import Scenario, apply_overrides, load_scenario, parse_scenario
from fedopt.errors import ConfigError, RunError
from fedopt.report import METRICS_FILE, MetricsLog, jsonable, write_text_atomic

if TYPE_CHECKING:
    from fedopt.simulation import RunResult

__all__ = [
    "PLACEMENT_KEYS",
    "RESUMES_FILE",
    "ResumePlan",
    "continue_run",
    "flatten",
    "plan_resume",
    "resume",
    "scenario_changes",
]

RESUMES_FILE = "resumes.jsonl"
#: Dotted scenario keys that say where a run executes, not what it computes.
PLACEMENT_KEYS = frozenset({"run.ray_address", "run.connect_timeout"})
_REQUIRED = ("round", "fingerprint", "scenario", "rows")

Row = dict[str, Any]


@dataclass(frozen=True)
class ResumePlan:
    """A checked resume, ready to run: the scenario, the checkpoint, what changed."""

    run_dir: Path
    scenario: Scenario
    checkpoint: Checkpoint
    forced: bool = False
    changed: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    finished: bool = False

    @property
    def rows(self) -> list[Row]:
        """The metrics rows the checkpoint holds (every round up to its own)."""
        return list(self.checkpoint.payload["rows"])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: ``{"run": {"seed": 1}}`` -> ``{"run.seed": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def scenario_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every value that differs (``None``: not set)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def plan_resume(
    run_dir: str | Path,
    *,
    sets: Sequence[str] = (),
    scenario_path: str | Path | None = None,
    force: bool = False,
    ray_address: str | None = None,
) -> ResumePlan:
    """Check that ``run_dir`` can be resumed and with which scenario; change nothing yet.

    Raises
    ------
    ConfigError
        ``run_dir`` is not a directory, the scenario file is missing or invalid,
        or the scenario differs from the checkpoint's and ``force`` is off (the
        message lists every changed key, old -> new).
    RunError
        ``run_dir`` has no checkpoint that verifies, or its payload lacks a
        required entry.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError("run_dir", str(run_dir), "an existing run directory")
    path = Path(scenario_path) if scenario_path is not None else run_dir / "scenario.toml"
    ckpt = latest_checkpoint(run_dir)
    held = ckpt is not None and isinstance(ckpt.payload.get("scenario"), Mapping)
    if scenario_path is None and not path.exists() and held:  # deleted: the checkpoint has it
        scenario = parse_scenario(apply_overrides(dict(ckpt.payload["scenario"]), sets))
    else:
        scenario = load_scenario(path, sets)
    if ckpt is None:
        raise RunError(
            f"{run_dir} has no checkpoint to resume from (none verified under checkpoints/); "
            f"start it over with: fedopt run {path}"
        )
    missing = [key for key in _REQUIRED if key not in ckpt.payload]
    if missing or not isinstance(ckpt.payload.get("rows"), list):
        raise RunError(f"checkpoint {ckpt.path} lacks {', '.join(missing) or 'a list of rows'}")
    if ray_address:
        scenario = scenario.replace(**{"run.ray_address": ray_address})
    changed: dict[str, tuple[Any, Any]] = {}
    needs_force = False
    if scenario.fingerprint() != ckpt.payload["fingerprint"]:
        changed = scenario_changes(ckpt.payload["scenario"], scenario.to_dict())
        relevant = {k: v for k, v in changed.items() if k not in PLACEMENT_KEYS}
        needs_force = bool(relevant) or not changed
        if needs_force and not force:
            what = _describe(relevant) or (
                f"fingerprint {ckpt.payload['fingerprint']} -> {scenario.fingerprint()}"
            )
            raise ConfigError(
                "scenario",
                str(path),
                f"the scenario run {run_dir.name} was checkpointed with (round {ckpt.round}); "
                f"changed: {what}. --force resumes anyway and records the change",
            )
    finished = _finished(run_dir, scenario)
    return ResumePlan(
        run_dir, scenario, ckpt, forced=needs_force, changed=changed, finished=finished
    )


def _finished(run_dir: Path, scenario: Scenario) -> bool:
    """True when ``summary.json`` says completed and the rows reach the scenario's last round."""
    from fedopt.report import read_metrics

    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
        rows = read_metrics(run_dir)
    except (OSError, ValueError, AttributeError, ConfigError):
        return False
    last = max((int(r.get("round", 0)) for r in rows), default=0)
    return status == "completed" and last >= scenario.run.rounds


def _record(plan: ResumePlan) -> None:
    """Append this resume to ``resumes.jsonl`` (fsynced)."""
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "from_round": plan.checkpoint.round,
        "checkpoint": plan.checkpoint.path.name,
        "forced": plan.forced,
        "changed": {k: {"old": old, "new": new} for k, (old, new) in plan.changed.items()},
        "from_fingerprint": plan.checkpoint.payload["fingerprint"],
        "fingerprint": plan.scenario.fingerprint(),
    }
    with MetricsLog(plan.run_dir / RESUMES_FILE) as log:
        log.append(json.loads(json.dumps(entry, default=str)))  # TOML dates as text


def continue_run(plan: ResumePlan, *, on_row: Callable[[Row], None] | None = None) -> RunResult:
    """Record the resume, cut ``metrics.jsonl`` back to the checkpoint and run the rest.

    The record and the cut are written once the engine is up (``before`` of
    :func:`~fedopt.simulation.run_batch`), so a resume that cannot start
    changes nothing. Returns the :class:`~fedopt.simulation.RunResult` of the
    resumed run (for a finished run, its result as it stands).
    """
    from fedopt import simulation
    from fedopt.runlock import run_lock

    if plan.finished:  # nothing to recompute, nothing written
        return simulation.load_result(plan.run_dir)

    def start() -> None:  # the engine is up and the driver about to restore the checkpoint
        simulation.write_scenario(plan.run_dir, plan.scenario)
        _record(plan)
        lines = [json.dumps(jsonable(row), allow_nan=False) + "\n" for row in plan.rows]
        write_text_atomic(plan.run_dir / METRICS_FILE, "".join(lines))

    with run_lock(plan.run_dir):  # refused, before anything is written, while another writes it
        cb = (lambda i, row: on_row(row)) if on_row is not None else None
        results = simulation.run_batch(
            [plan.scenario], [plan.run_dir], on_row=cb, restore=[plan.checkpoint], before=[start]
        )
    return results[0]


def resume(
    run_dir: str | Path,
    *,
    sets: Sequence[str] = (),
    scenario_path: str | Path | None = None,
    force: bool = False,
    ray_address: str | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> RunResult:
    """Continue a stopped run from its newest checkpoint; return its ``RunResult``.

    Parameters
    ----------
    run_dir : path
        The run directory (``runs/<name>/<timestamp>``).
    sets : sequence of str
        ``key=value`` overrides applied to the scenario.
    scenario_path : path, optional
        Use this scenario file instead of ``run_dir/scenario.toml``.
    force : bool
        Resume even when the scenario differs from the checkpoint's; the
        change is recorded in ``resumes.jsonl``.
    ray_address : str, optional
        Join an existing Ray cluster (not a scenario change).
    on_row : callable, optional
        Called with each new metrics row as its round ends.
    """
    plan = plan_resume(
        run_dir, sets=sets, scenario_path=scenario_path, force=force, ray_address=ray_address
    )
    return continue_run(plan, on_row=on_row)
