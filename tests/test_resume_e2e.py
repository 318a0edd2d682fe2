"""SIGTERM a `fedopt run` on Ray, `fedopt resume` it: the checkpoint decides every row and ε.

The run is a secret DP run (its noise key is drawn anew by every `fedopt run`),
so two resumes of copies of the same cut run directory must agree bitwise: the
key comes back from the checkpoint, in fresh Ray workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from inline import strip_wall

SCENARIO = {
    "name": "resume_dp",
    "data": {"name": "blobs", "num_examples": 600, "num_features": 8},
    "partition": {"name": "dirichlet", "num_clients": 6, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "dpsgd", "batch_size": 16, "lr": 0.3, "target_epsilon": 3.0},
    "run": {"rounds": 20, "seed": 4, "workers": 2, "checkpoint_every": 0, "fed_eval_every": 5},
}
FEDOPT = str(Path(sys.executable).with_name("fedopt"))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_dir(out):
    (found,) = [p for p in out.glob("resume_dp/*") if p.is_dir()]
    return found


def start(path, out, env):
    return subprocess.Popen(
        [FEDOPT, "run", str(path), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def cut_after_round_2(path, out, env):
    """Start a run, SIGTERM it once rounds 0-2 are written; return its run directory."""
    cut = start(path, out, env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list(out.glob("resume_dp/*/metrics.jsonl"))
        if found and sum(1 for _ in found[0].open()) >= 3:  # rows of rounds 0, 1, 2
            break
        time.sleep(0.2)
    cut.send_signal(signal.SIGTERM)
    stdout, stderr = cut.communicate(timeout=300)
    assert cut.returncode == 130, stderr.decode()[-2000:]
    assert "fedopt resume" in (stdout + stderr).decode()
    run_dir = only_dir(out)
    assert len(rows(run_dir)) < SCENARIO["run"]["rounds"] + 1
    return run_dir


def resume(run_dir, env):
    again = subprocess.run([FEDOPT, "resume", str(run_dir)], env=env, capture_output=True)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    log = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(log) == 1 and not log[0]["forced"]
    return rows(run_dir), json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_sigterm_then_resume_on_ray_is_determined_by_the_checkpoint(tmp_path):
    """A secret DP run cut by SIGTERM; two resumes of copies of its directory agree bitwise.

    Every `fedopt run` of a secret scenario draws a new key, so there is no
    uninterrupted twin on Ray (the inline tests compare with one for every
    strategy and local optimizer, sharing the key): if the resumed workers did
    not get the key back from the checkpoint, the two resumes would differ.
    """
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(SCENARIO))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = cut_after_round_2(path, tmp_path / "cut", env)
    twin = tmp_path / "twin" / run_dir.name
    shutil.copytree(run_dir, twin)
    first, summary = resume(run_dir, env)
    second, twin_summary = resume(twin, env)
    assert len(first) == SCENARIO["run"]["rounds"] + 1 and first[-1]["epsilon_max"] > 0
    assert strip_wall(first) == strip_wall(second)
    assert summary["clients_final"] == twin_summary["clients_final"]  # every client's ε
    assert summary["privacy"]["sample_level"]["noise"] == "secret"
