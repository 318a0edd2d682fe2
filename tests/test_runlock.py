"""One writer per run directory: a second process is refused in one line, SIGKILL frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedopt.errors import ConfigError
from fedopt.report import regenerate
from fedopt.resume import ResumePlan, continue_run
from fedopt.runlock import LOCK_FILE, run_lock

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from fedopt.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""

TRY = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("locked")
"""


@pytest.fixture
def holder(tmp_path):
    """A child process holding ``tmp_path``'s lock; killed (SIGKILL) at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _probe(run_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_second_process_is_refused_naming_the_holder_and_sigkill_frees_it(tmp_path, holder):
    with pytest.raises(ConfigError) as info:
        with run_lock(tmp_path):
            raise AssertionError("entered a lock another process holds")
    assert info.value.key == "run_dir"
    assert f"no other fedopt process is writing (PID {holder.pid} holds it)" in str(info.value)
    assert "\n" not in str(info.value)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path) as got:  # the kernel dropped the dead process's lock
        assert got == tmp_path.resolve()
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_the_lock_is_reentrant_in_one_process_and_released_on_exit(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path / "."):
            assert _probe(tmp_path) == "locked"
        assert _probe(tmp_path) == "locked"  # the outer block still holds it
    assert _probe(tmp_path) == "free"


def test_a_resume_of_a_directory_being_written_changes_nothing(tmp_path, holder):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1}\n{"round": 2}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    plan = ResumePlan(tmp_path, None, None, forced=False, changed={})
    with pytest.raises(ConfigError, match="no other fedopt process is writing"):
        continue_run(plan)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ConfigError, match="no other fedopt process is writing"):
        regenerate(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
