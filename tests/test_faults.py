"""Injected client faults: reproducible draws, dropped clients, too few replies, dead workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from inline import run_inline, scenario_with

from fedopt.errors import ConfigError, RunError
from fedopt.faults import FaultParams, fault_draw

RAW = {
    "name": "faults",
    "data": {"name": "blobs", "num_examples": 600, "num_features": 10},
    "partition": {"num_clients": 6, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 16, "lr": 0.2},
    "run": {"rounds": 4, "seed": 3, "fed_eval_every": 0},
}


def expected_failures(params, rounds, clients, seed=3):
    return {
        r: [c for c in range(clients) if fault_draw(seed, params, r, c) is not None]
        for r in range(1, rounds + 1)
    }


def test_injected_errors_drop_exactly_the_drawn_clients(caplog):
    params = FaultParams(client_error=0.3)
    want = expected_failures(params, 4, 6)
    assert any(want.values()) and not all(len(v) == 6 for v in want.values())
    s = scenario_with(RAW, faults__client_error=0.3)
    with caplog.at_level(logging.WARNING, logger="fedopt"):
        rows, _, _ = run_inline(s)
    for row in rows[1:]:
        assert row.get("failed_clients", []) == want[row["round"]]
        assert row["clients"] == [c for c in range(6) if c not in want[row["round"]]]
    assert "injected error" in caplog.text


def test_a_worker_crash_outside_ray_is_an_error_reply():
    s = scenario_with(RAW, faults__worker_crash=0.3)
    rows, _, _ = run_inline(s)  # still alive: no Ray worker to kill here
    want = expected_failures(FaultParams(worker_crash=0.3), 4, 6)
    assert [r.get("failed_clients", []) for r in rows[1:]] == [want[r] for r in range(1, 5)]


def test_too_many_faults_stop_the_run_with_the_reasons():
    s = scenario_with(RAW, faults__client_error=1.0, run__min_replies=2)
    with pytest.raises(RunError, match="0 of 6 clients replied.*injected error"):
        run_inline(s)


def test_fault_probabilities_are_validated():
    with pytest.raises(ConfigError, match="faults.client_error"):
        scenario_with(RAW, faults__client_error=1.5)
    with pytest.raises(ConfigError, match="worker_crash"):
        scenario_with(RAW, faults__client_error=0.6, faults__worker_crash=0.6)


@pytest.mark.slow
def test_a_dead_ray_worker_is_replaced_and_the_run_goes_on(tmp_path):
    from fedopt.simulation import run

    root = Path(__file__).resolve().parents[1]
    params = FaultParams(worker_crash=0.15)
    want = expected_failures(params, 4, 10, seed=0)
    assert want[1] and not any(want[r] for r in (2, 3, 4))  # one crash, in round 1
    sets = ["run.rounds=4", "run.fed_eval_every=0", "faults.worker_crash=0.15"]
    result = run(root / "scenarios" / "quickstart.toml", sets=sets, out=tmp_path)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["failed_clients"] == want[1]
    assert [r["num_clients"] for r in rows[2:]] == [10, 10, 10]  # the worker came back
    assert "died" in (result.run_dir / "engine.log").read_text()
