"""A disk that fills mid-run: one line naming the file; the rows already written are kept."""

from __future__ import annotations

import errno
import json
import pickle

import pytest
from inline import execute_inline

from fedopt import report, simulation
from fedopt.config import load_scenario
from fedopt.errors import StorageError, is_storage_fault

QUICK = "scenarios/quickstart.toml"
SETS = ["run.rounds=5", "run.fed_eval_every=0", "run.checkpoint_every=1"]


def _execute(run_dir):
    return execute_inline(load_scenario(QUICK, SETS), run_dir)


def _full_after(monkeypatch, writes: int) -> None:
    """MetricsLog.append succeeds ``writes`` times, then the disk is full."""
    real = report.MetricsLog.append
    count = {"n": 0}

    def append(self, row):
        count["n"] += 1
        if count["n"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, row)

    monkeypatch.setattr(report.MetricsLog, "append", append)


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_rows_and_checkpoint(tmp_path, monkeypatch):
    _full_after(monkeypatch, writes=3)  # rounds 0, 1, 2 are written
    with pytest.raises(StorageError) as info:
        _execute(tmp_path)
    message = str(info.value)
    assert message.startswith(f"writing {tmp_path / 'metrics.jsonl'} failed: No space left")
    assert "\n" not in message
    assert info.value.__notes__ == [
        f"newest checkpoint: round 2; continue from it with: fedopt resume {tmp_path}"
    ]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == f"failed: {message}"


def test_when_the_summary_cannot_be_written_either_the_first_failure_is_kept(tmp_path, monkeypatch):
    _full_after(monkeypatch, writes=2)

    def no_space(run_dir, rows, *, extra):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "summary.json"))

    monkeypatch.setattr(simulation, "write_run_files", no_space)
    with pytest.raises(StorageError, match="metrics.jsonl failed") as info:
        _execute(tmp_path)
    assert info.value.__notes__[-1] == (
        "summary.json and metrics.csv not rewritten: No space left on device"
    )


def test_storage_faults_are_told_apart_and_the_error_pickles():
    assert is_storage_fault(OSError(errno.ENOSPC, "full"))
    assert is_storage_fault(OSError(errno.EROFS, "read-only"))
    assert not is_storage_fault(OSError(errno.ECONNREFUSED, "refused"))
    assert not is_storage_fault(ValueError("x"))
    err = StorageError("/r", OSError(errno.ENOSPC, "No space left on device", "/r/m"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StorageError and str(back) == str(err)
