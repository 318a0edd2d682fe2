"""End to end through Flower's simulation engine on Ray (slow: each test starts Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from inline import strip_wall

from fedopt.compare import load_sweep, run_sweep
from fedopt.config import load_scenario
from fedopt.errors import DivergenceError
from fedopt.simulation import run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "scenarios" / "quickstart.toml"


def test_tiny_quickstart_writes_a_complete_run_directory(tmp_path):
    result = run(QUICK, sets=["run.rounds=3", "run.fed_eval_every=3"], out=tmp_path)
    d = result.run_dir
    for name in (
        "scenario.toml",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "engine.log",
        "accuracy_vs_round.png",
        "loss_vs_round.png",
        "accuracy_vs_sim_time.png",
        "accuracy_vs_bytes.png",
        "loss_vs_sim_time.png",
        "loss_vs_bytes.png",
    ):
        assert (d / name).stat().st_size > 0, name
    assert d.parent.name == "quickstart" and d.parent.parent == tmp_path.resolve()
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["num_clients"] == 10 and "fed_accuracy_worst10" in rows[3]
    s = result.summary
    assert s["status"] == "completed" and s["client_device"] == "cpu"
    assert s["final_accuracy"] == rows[3]["central_accuracy"] > 0.5
    assert s["bytes_total"] == sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rows)
    assert s["versions"]["flwr"].startswith("1.41")
    assert load_scenario(d / "scenario.toml") == load_scenario(
        QUICK, ["run.rounds=3", "run.fed_eval_every=3"]
    )


def test_same_seed_same_metrics_whatever_the_number_of_workers(tmp_path):
    sets = [
        "run.rounds=3",
        "partition.name=dirichlet",
        "partition.alpha=0.5",
        "run.clients_per_round=6",
        "heterogeneity.availability=0.8",
    ]
    one = run(QUICK, sets=[*sets, "run.workers=1"], out=tmp_path / "a")
    two = run(QUICK, sets=[*sets, "run.workers=2"], out=tmp_path / "b")
    assert strip_wall(one.rows) == strip_wall(two.rows)
    assert len(one.rows) == 4


def test_compare_sweep_2x2x1(tmp_path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        f'name = "mini"\nbase = "{QUICK}"\nseeds = [0]\ntarget_accuracy = 0.5\n'
        "[scenario]\nrun.rounds = 2\nrun.fed_eval_every = 0\n"
        '[[strategies]]\nlabel = "fedavg"\nstrategy.name = "fedavg"\n'
        '[[strategies]]\nlabel = "fedprox"\nstrategy.name = "fedprox"\nstrategy.proximal_mu = 0.1\n'
        '[[settings]]\nlabel = "iid"\npartition.name = "iid"\n'
        '[[settings]]\nlabel = "skewed"\npartition.name = "dirichlet"\npartition.alpha = 0.1\n'
    )
    sweep = load_sweep(sweep_file)
    out_dir, paths = run_sweep(sweep, out=tmp_path)
    table = Path(paths["markdown"]).read_text()
    for label in (
        "| iid | fedavg |",
        "| iid | fedprox |",
        "| skewed | fedavg |",
        "| skewed | fedprox |",
    ):
        assert label in table
    cells = sorted(
        p.relative_to(out_dir / "cells").as_posix() for p in (out_dir / "cells").glob("*/*/*")
    )
    assert cells == [
        "iid/fedavg/seed0",
        "iid/fedprox/seed0",
        "skewed/fedavg/seed0",
        "skewed/fedprox/seed0",
    ]
    # a cell of the sweep equals the same scenario run on its own
    alone = run(
        load_scenario(out_dir / "cells/skewed/fedprox/seed0/scenario.toml"), out=tmp_path / "alone"
    )
    cell_rows = [
        json.loads(x)
        for x in (out_dir / "cells/skewed/fedprox/seed0/metrics.jsonl").read_text().splitlines()
    ]
    assert strip_wall(cell_rows) == strip_wall(alone.rows)


def test_divergence_stops_the_run_and_keeps_metrics(tmp_path):
    with pytest.raises(DivergenceError) as info:
        run(QUICK, sets=["run.rounds=4", "client.lr=1e30"], out=tmp_path)
    assert "diverged in round" in str(info.value)
    run_dir = next(tmp_path.glob("quickstart/*"))
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["round"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("failed: training diverged")


@pytest.mark.skipif(
    shutil.which("flwr", path=str(Path(sys.executable).parent)) is None, reason="flwr CLI"
)
def test_flwr_run_dot_runs_the_default_scenario_offline(tmp_path):
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path),
        FLWR_HOME=str(tmp_path / ".flwr"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    flwr = str(Path(sys.executable).parent / "flwr")
    out = tmp_path / "out"
    cmd = [
        flwr,
        "run",
        ".",
        "--stream",
        "--federation-config",
        "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.0",
        "--run-config",
        f'set="run.rounds=2;run.fed_eval_every=0" out-dir="{out}"',
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        listing = subprocess.run(
            [flwr, "ls", "--format", "json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        runs = json.loads(listing.stdout)["runs"]
        assert runs and runs[-1]["status"] == "finished:completed", listing.stdout
        summary = json.loads(next(out.glob("quickstart/*/summary.json")).read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 2
    finally:
        found = subprocess.run(["pgrep", "-f", f"{tmp_path}"], capture_output=True, text=True)
        for pid in found.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGTERM)
        time.sleep(1)


def test_custom_model_from_a_user_module_runs_on_ray(tmp_path, monkeypatch):
    from fedopt.config import parse_scenario, read_toml

    (tmp_path / "usermodels.py").write_text(
        "from torch import nn\n"
        "def tiny(input_shape, num_classes, *, width=8):\n"
        "    n = 1\n"
        "    for d in input_shape:\n"
        "        n *= d\n"
        "    head = nn.Linear(width, num_classes)\n"
        "    layers = [nn.Flatten(), nn.Linear(n, width), nn.Tanh(), head]\n"
        "    return nn.Sequential(*layers)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = read_toml(QUICK)
    raw["model"] = {"name": "usermodels:tiny", "width": 12}
    raw["run"].update(rounds=2, fed_eval_every=0)
    result = run(parse_scenario(raw), out=tmp_path / "runs")
    assert result.summary["status"] == "completed"
    assert load_scenario(result.run_dir / "scenario.toml").model.params["width"] == 12
    assert result.rows[-1]["central_accuracy"] > result.rows[0]["central_accuracy"]


def test_lm_fedavg_warm_starts_and_lowers_perplexity_on_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPT_CACHE", str(tmp_path / "cache"))  # a cold cache: pretrain here
    sets = [
        "pretrain.steps=60",
        "data.seq_len=64",
        "run.rounds=3",
        "run.eval_every=1",
        "run.clients_per_round=4",
        "client.steps=10",
        "client.lr=0.002",
    ]
    result = run(ROOT / "scenarios" / "lm_fedavg.toml", sets=sets, out=tmp_path / "runs")
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    ppl = [r["central_perplexity"] for r in rows]
    assert len(ppl) == 4 and ppl[-1] < ppl[0] < 259  # below the byte vocabulary: warm-started
    assert result.summary["final_perplexity"] == ppl[-1]
    assert (result.run_dir / "perplexity_vs_round.png").stat().st_size > 0
    assert len(list((tmp_path / "cache" / "pretrain").iterdir())) == 1
