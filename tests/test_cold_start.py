"""Start-up: the task built once on the driver and shared with the workers, and its timeline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedopt import ray_backend
from fedopt.config import load_scenario, parse_scenario
from fedopt.startup import STARTUP_FILE, Startup
from fedopt.task import build_task

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "scenarios" / "quickstart.toml"


@pytest.fixture
def quick():
    return load_scenario(QUICK, ["run.rounds=2"])


@pytest.fixture
def clean_shelf():
    saved = dict(ray_backend._ADOPTED)
    ray_backend._ADOPTED.clear()
    yield ray_backend._ADOPTED
    ray_backend._ADOPTED.clear()
    ray_backend._ADOPTED.update(saved)


def _same_task(a, b) -> None:
    assert a.num_clients == b.num_clients
    for pa, pb in zip(a.parts, b.parts, strict=True):
        assert np.array_equal(pa, pb)
    assert np.array_equal(a.data.train.x, b.data.train.x)
    assert np.array_equal(a.data.train.y, b.data.train.y)
    ma, mb = a.new_model().state_dict(), b.new_model().state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_shared_task_is_the_drivers_task_with_the_workers_scenario(quick, clean_shelf):
    task = build_task(quick)
    ray_backend.adopt({quick.fingerprint(): task})
    worker_scenario = parse_scenario(quick.to_dict())  # what a worker parses from its message
    got = ray_backend.shared_task(worker_scenario)
    assert got is not None
    assert got.scenario is worker_scenario
    assert got.data is task.data and got.parts is task.parts  # shared, not rebuilt
    _same_task(got, build_task(worker_scenario))


def test_no_shared_task_for_another_scenario(quick, clean_shelf):
    ray_backend.adopt({quick.fingerprint(): build_task(quick)})
    assert ray_backend.shared_task(quick.replace(**{"run.seed": 1})) is None


def test_local_init_args_drop_the_runtime_env_a_remote_one_keeps_it(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/extra")
    local = ray_backend.init_args({"init_args": {"log_to_driver": False}})
    assert "runtime_env" not in local
    assert local == {"include_dashboard": False, "log_to_driver": False}
    assert os.environ["PYTHONPATH"].split(os.pathsep)[: len(sys.path)] == sys.path
    assert os.environ["PYTHONPATH"].endswith("/extra")
    remote = ray_backend.init_args({"init_args": {"address": "ray://head:10001"}})
    assert remote["address"] == "ray://head:10001"
    assert remote["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == sys.path[0]


def test_startup_marks_keep_the_first_time_and_are_written(tmp_path):
    clock = Startup()
    clock.mark("entered", 100.0)
    clock.mark("ray", 101.5)
    clock.mark("entered", 200.0)  # a second mark of a step is ignored
    clock.mark("tasks", 100.5)
    assert clock.seconds() == {"entered": 0.0, "tasks": 0.5, "ray": 1.5}
    clock.write(tmp_path)
    saved = json.loads((tmp_path / STARTUP_FILE).read_text())
    assert saved["epoch"] == {"entered": 100.0, "ray": 101.5, "tasks": 100.5}
    assert list(saved["seconds"]) == ["entered", "tasks", "ray"]


@pytest.mark.slow
def test_warm_actors_adopt_the_task_through_the_object_store(quick, clean_shelf):
    import ray

    from fedopt.simulation import backend_config

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warm = ray_backend.prestart(backend_config(quick))
    try:
        assert warm.started_ray and len(warm.actors) >= 1
        task = build_task(quick)
        warm.share({quick.fingerprint(): task})
        assert [ray.get(a.adopted.remote()) for a in warm.actors] == [[quick.fingerprint()]] * len(
            warm.actors
        )
        assert len(warm.ready_times()) == len(warm.actors)
        # what the workers got is the driver's task, value for value
        back = ray.get(ray_backend._SHARED_REFS[quick.fingerprint()])
        _same_task(back, task)
        # a replacement actor (a dead one's) is created with the shared tasks
        ray.kill(warm.actors[0])  # frees its CPU for the replacement
        late = ray_backend._new_actor({"num_cpus": 1, "num_gpus": 0.0})
        assert ray.get(late.adopted.remote()) == [quick.fingerprint()]
    finally:
        warm.close()
    assert not ray.is_initialized()
    assert ray_backend._SHARED_REFS == {} and ray_backend._PRESTARTED == {}


@pytest.mark.slow
def test_a_run_writes_its_startup_timeline_in_order(tmp_path):
    from fedopt.simulation import run

    result = run(QUICK, sets=["run.rounds=1"], out=tmp_path)
    marks = json.loads((result.run_dir / STARTUP_FILE).read_text())["epoch"]
    for step in ("entered", "ray", "tasks", "shared", "federation", "round_0", "round_1"):
        assert step in marks, step
    assert marks["entered"] <= marks["ray"] <= marks["shared"] <= marks["federation"]
    assert marks["tasks"] <= marks["shared"] <= marks["round_0"] <= marks["round_1"]
    assert "actors_warm" in marks


def test_bad_input_found_while_the_task_builds_leaves_no_run_directory(tmp_path):
    from fedopt.errors import ConfigError
    from fedopt.simulation import run

    with pytest.raises(ConfigError):
        run(QUICK, sets=["partition.num_clients=5000"], out=tmp_path)
    assert not any((tmp_path / "quickstart").glob("*"))
