"""``fedopt compare --resume``: finished cells are read back, the interrupted one continues.

``run_batch`` is replaced by a deterministic stand-in that writes real run
directories (scenario, metrics, checkpoints, summary) and can be stopped
mid-cell, so the sweep logic is tested without an engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedopt.compare
from fedopt.checkpoint import save_checkpoint
from fedopt.compare import load_sweep, run_sweep
from fedopt.errors import ConfigError, DivergenceError, RunInterrupted
from fedopt.report import MetricsLog, write_run_files
from fedopt.simulation import load_result, write_scenario

ROOT = Path(__file__).resolve().parents[1]

SWEEP = f"""
name = "tiny"
base = "{ROOT / "scenarios" / "quickstart.toml"}"
seeds = [0, 1]

[scenario]
run.rounds = 4

[[strategies]]
label = "slow"
client.lr = 0.1

[[strategies]]
label = "fast"
client.lr = 0.3
"""


def _row(sc, r: int) -> dict:
    acc = round(0.1 + 0.2 * r * sc.client.params.lr + 0.01 * sc.run.seed, 6)
    return {"round": r, "central_accuracy": acc, "central_loss": 2.0 - acc}


class FakeBatch:
    """Writes each run's directory; stops with RunInterrupted in round 2 of run ``stop_at``."""

    def __init__(self, stop_at: int | None = None, diverge_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.diverge_at = diverge_at
        self.calls: list[list[tuple[str, int | None]]] = []
        self.started = 0

    def __call__(
        self, scenarios, dirs, *, on_done=None, restore=None, before=None, on_diverged=None, **kw
    ):
        restore = restore or [None] * len(scenarios)
        before = before or [None] * len(scenarios)
        self.calls.append(
            [(str(d), c.round if c else None) for d, c in zip(dirs, restore, strict=True)]
        )
        for j, (sc, run_dir) in enumerate(zip(scenarios, dirs, strict=True)):
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if before[j] is not None:
                before[j]()
            else:
                write_scenario(run_dir, sc)
            first = restore[j].round + 1 if restore[j] is not None else 0
            rows = list(restore[j].payload["rows"]) if restore[j] is not None else []
            with MetricsLog(run_dir / "metrics.jsonl") as log:
                for r in range(first, sc.run.rounds + 1):
                    rows.append(_row(sc, r))
                    log.append(rows[-1])
                    if self.started == self.stop_at and r == 2:
                        payload = {"round": 2, "rows": rows, "fingerprint": sc.fingerprint()}
                        save_checkpoint(run_dir, {**payload, "scenario": sc.to_dict()}, round_=2)
                        write_run_files(run_dir, rows, extra={"status": "interrupted: test"})
                        self.started += 1
                        raise RunInterrupted(2, run_dir)
            if self.started == self.diverge_at:
                err = DivergenceError(sc.run.rounds, "training loss", [0])
                write_run_files(run_dir, rows, extra={"status": f"failed: {err}"})
                self.started += 1
                on_diverged(j, err)  # the real run_batch goes on with the next run
                continue
            write_run_files(run_dir, rows, extra={"status": "completed"})
            self.started += 1
            if on_done is not None:
                on_done(j, load_result(run_dir))
        return []


def _table(out_dir: Path) -> str:
    return (out_dir / "comparison.md").read_text().replace(str(out_dir), "DIR")


def test_a_resumed_sweep_keeps_finished_cells_and_continues_the_stopped_one(tmp_path, monkeypatch):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    sweep = load_sweep(path)
    monkeypatch.setattr(fedopt.compare, "run_batch", FakeBatch())
    whole, _ = run_sweep(sweep, out=tmp_path / "whole")

    stopped = FakeBatch(stop_at=2)  # the third cell stops after its round 2
    monkeypatch.setattr(fedopt.compare, "run_batch", stopped)
    with pytest.raises(RunInterrupted):
        run_sweep(sweep, out=tmp_path / "parts")
    [sweep_dir] = (tmp_path / "parts" / "tiny").iterdir()

    again = FakeBatch()
    monkeypatch.setattr(fedopt.compare, "run_batch", again)
    seen = []
    out_dir, _ = run_sweep(sweep, resume=sweep_dir, on_cell=lambda i, c: seen.append(i))
    assert out_dir == sweep_dir.resolve()
    [call] = again.calls  # only the stopped cell (from its checkpoint) and the one never started
    assert [Path(d).relative_to(sweep_dir).as_posix() for d, _ in call] == [
        "cells/base/fast/seed0",
        "cells/base/fast/seed1",
    ]
    assert [r for _, r in call] == [2, None]
    assert sorted(seen) == [1, 2, 3, 4]
    assert _table(out_dir) == _table(whole)
    rows = (sweep_dir / "cells/base/fast/seed0/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in rows] == [0, 1, 2, 3, 4]  # cut, then continued

    monkeypatch.setattr(fedopt.compare, "run_batch", FakeBatch())  # all done: nothing reruns
    run_sweep(sweep, resume=sweep_dir)
    assert fedopt.compare.run_batch.calls == []


def test_resume_refuses_a_directory_of_another_definition_or_no_sweep(tmp_path, monkeypatch):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    monkeypatch.setattr(fedopt.compare, "run_batch", FakeBatch())
    out_dir, _ = run_sweep(load_sweep(path), out=tmp_path)
    changed = load_sweep(path, ["run.rounds=5"])
    with pytest.raises(ConfigError, match="a directory of this sweep as defined now"):
        run_sweep(changed, resume=out_dir)
    with pytest.raises(ConfigError, match="a sweep directory \\(with sweep.json\\)"):
        run_sweep(changed, resume=tmp_path)


def test_a_diverged_cell_is_a_result_listed_as_stopped_and_not_rerun(tmp_path, monkeypatch):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    sweep = load_sweep(path)
    monkeypatch.setattr(fedopt.compare, "run_batch", FakeBatch(diverge_at=3))
    seen = []
    out_dir, _ = run_sweep(sweep, out=tmp_path, on_cell=lambda i, c: seen.append(i))
    assert seen == [1, 2, 3, 4]
    text = (out_dir / "comparison.md").read_text()
    assert (
        "Stopped early (their rows up to the stop are in the table):\n\n"
        "- base / fast / seed 1: failed: training diverged in round 4: non-finite training loss "
        "(clients [0])\n"
    ) in text
    monkeypatch.setattr(fedopt.compare, "run_batch", FakeBatch())
    run_sweep(sweep, resume=out_dir)
    assert fedopt.compare.run_batch.calls == []
