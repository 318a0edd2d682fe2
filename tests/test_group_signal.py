"""Signals and kills from outside: a group SIGTERM checkpoints, a SIGKILL leaves no orphan.

SIGTERM to the whole process group (as ``timeout``, SLURM, systemd send it):
Ray's processes run in process groups of their own, so the signal reaches the
driver only: the round finishes, a checkpoint is written and the exit status
is 130 (before, the workers died first and the run failed with no
checkpoint). SIGKILL of the driver: the watchdog kills every Ray process it
leaves (before, the dashboard and runtime-env agents lived on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_130(tmp_path):
    cmd = [sys.executable, "-m", "fedopt.cli", "run", "scenarios/quickstart.toml"]
    cmd += ["--out", str(tmp_path), "--set", "run.rounds=60", "--set", "run.checkpoint_every=0"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 400
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("quickstart/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:  # round 2 is done
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, proc.communicate(timeout=60)
    os.killpg(proc.pid, signal.SIGTERM)  # the driver's whole group, not the driver alone
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 130, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["round"]
    assert f"stopped by SIGTERM after round {last}" in err
    assert (metrics.parent / "checkpoints" / f"round-{last:06d}.ckpt").is_file()


@pytest.mark.slow
def test_sigkill_of_a_run_leaves_no_ray_process_behind(tmp_path):
    import psutil

    cmd = [sys.executable, "-m", "fedopt.cli", "run", "scenarios/quickstart.toml"]
    cmd += ["--out", str(tmp_path), "--set", "run.rounds=60"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("quickstart/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    kids = psutil.Process(proc.pid).children(recursive=True)
    names = {k.name() for k in kids}
    assert {"raylet", "gcs_server", "ray::DashboardAgent"} <= names, names
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=30)
    for k in alive:  # leave the machine clean whatever the verdict
        k.kill()
    assert [k.name() for k in alive] == []
