"""SIGTERM a `fedopt run` on Ray, `fedopt resume` it: the same metrics.jsonl and ε.

The replayable run must equal an uninterrupted run. A secret run (its noise key
is drawn anew by every `fedopt run`) cannot be compared with another run, so two
resumes of copies of the same cut run directory must agree bitwise: the key
comes back from the checkpoint, in fresh Ray workers.
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
    "run": {"rounds": 40, "seed": 4, "workers": 2, "checkpoint_every": 0, "fed_eval_every": 10},
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
@pytest.mark.parametrize("noise", ["replayable", "secret"])
def test_sigterm_and_resume_reproduce_the_uninterrupted_run(tmp_path, noise):
    scenario = {**SCENARIO, "client": {**SCENARIO["client"], "noise": noise}}
    if noise == "secret":
        scenario["run"] = {**SCENARIO["run"], "rounds": 12}
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(scenario))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = cut_after_round_2(path, tmp_path / "cut", env)
    if noise == "secret":
        twin = tmp_path / "twin" / run_dir.name
        shutil.copytree(run_dir, twin)
        first, summary = resume(run_dir, env)
        second, twin_summary = resume(twin, env)
        assert len(first) == scenario["run"]["rounds"] + 1
        assert strip_wall(first) == strip_wall(second)
        assert summary["clients_final"] == twin_summary["clients_final"]
        assert summary["privacy"]["sample_level"]["noise"] == "secret"
        return
    whole = subprocess.run(
        [FEDOPT, "run", str(path), "--out", str(tmp_path / "whole")], env=env, capture_output=True
    )
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    resumed, final = resume(run_dir, env)
    reference = rows(only_dir(tmp_path / "whole"))
    assert strip_wall(resumed) == strip_wall(reference)
    ref_final = json.loads((only_dir(tmp_path / "whole") / "summary.json").read_text())
    assert final["clients_final"] == ref_final["clients_final"]  # every client's ε
    assert reference[-1]["epsilon_max"] > 0
