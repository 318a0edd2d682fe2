"""Kill a run at some round, resume it from its checkpoint: the rows are bitwise the same."""

from __future__ import annotations

import pytest
from inline import InlineGrid, method_raw, noise_keys_for, scenario_with, strip_wall

from fedopt import clientapp
from fedopt.checkpoint import StopRequest, latest_checkpoint
from fedopt.clientapp import make_client_app
from fedopt.errors import RunInterrupted
from fedopt.registry import CLIENTS, STRATEGIES, load_builtins
from fedopt.resumable import Checkpointer
from fedopt.server import RoundDriver
from fedopt.simulation import run_noise_key
from fedopt.task import build_task

load_builtins()

RAW = {
    "name": "resume",
    "data": {"name": "blobs", "num_examples": 360, "num_features": 8},
    "partition": {"name": "dirichlet", "num_clients": 6, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 5, "seed": 2, "clients_per_round": 4, "fed_eval_clients": 3},
}


class KilledError(Exception):
    """The process died (no checkpoint written at this point)."""


def execute(scenario, run_dir, *, restore=None, stop_after=None, kill_after=None):
    """One in-process run on a fresh federation (new nodes, new worker state).

    A secret run starts with the fixed test key (so an uninterrupted run and a
    cut one draw the same noise); a resumed one takes its key from the
    checkpoint, as ``fedopt resume`` does.
    """
    clientapp._RESIDENT = clientapp._ResidentRuntime()  # a fresh worker process
    task = build_task(scenario)
    raw = scenario.to_dict()
    key, keys = noise_keys_for(scenario)
    if restore is not None:
        key = run_noise_key(scenario, restore)
        keys = {"": key} if key is not None else None
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}, noise_keys=keys), task.num_clients)
    rows = list(restore.payload["rows"]) if restore is not None else []
    stop = StopRequest()

    def emit(row):
        rows.append(row)
        if row["round"] == stop_after:
            stop.set("SIGTERM")
        if row["round"] == kill_after:
            raise KilledError

    driver_cls = getattr(STRATEGIES.get(scenario.strategy.name).obj, "driver", RoundDriver)
    driver = driver_cls(task, emit=emit)
    driver.checkpointer = Checkpointer(run_dir, rows, stop=stop)
    driver.restored = restore.payload if restore is not None else None
    driver.bind_noise_key(key)
    driver.run(grid)
    return rows


def raw_for(kind, name):
    return method_raw(RAW, kind, name)


CASES = [("strategy", n) for n in STRATEGIES.names()] + [("client", n) for n in CLIENTS.names()]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_sigterm_then_resume_gives_the_uninterrupted_rows(tmp_path, kind, name):
    sc = scenario_with(raw_for(kind, name), run__checkpoint_every=0)
    whole = execute(sc, tmp_path / "whole")
    with pytest.raises(RunInterrupted, match="after round 2"):
        execute(sc, tmp_path / "cut", stop_after=2)
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.round == 2
    resumed = execute(sc, tmp_path / "cut", restore=ckpt)
    assert strip_wall(resumed) == strip_wall(whole)


@pytest.mark.parametrize("kill_after", [1, 3, 4])
@pytest.mark.parametrize(
    "raw",
    [
        RAW,
        {**RAW, "client": {"name": "dpsgd", "noise_multiplier": 1.0, "epochs": 1}},
        raw_for("strategy", "fedfix"),
        raw_for("strategy", "decentralized"),
        raw_for("strategy", "fedkseed"),
        raw_for("strategy", "fedsvd"),
    ],
    ids=["sync", "dp", "async", "decentralized", "fedkseed", "fedsvd"],
)
def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, raw, kill_after):
    sc = scenario_with(raw, run__checkpoint_every=2)
    whole = execute(sc, tmp_path / "whole")
    with pytest.raises(KilledError):
        execute(sc, tmp_path / "cut", kill_after=kill_after)
    ckpt = latest_checkpoint(tmp_path / "cut")
    if kill_after < 2:
        assert ckpt is None  # nothing to resume from yet: the run starts over
        return
    assert ckpt.round == 2 * (kill_after // 2) or ckpt.round == 2
    resumed = execute(sc, tmp_path / "cut", restore=ckpt)
    assert strip_wall(resumed) == strip_wall(whole)


@pytest.mark.parametrize(
    "section",
    [
        {"curriculum": {"ordering": "curriculum"}},
        {"user_dp": {"noise_multiplier": 0.5, "clipping_norm": 1.0}},
        {"faults": {"client_error": 0.3}},
    ],
    ids=["curriculum", "user_dp", "faults"],
)
def test_sections_resume_bitwise(tmp_path, section):
    sc = scenario_with({**RAW, **section}, run__checkpoint_every=0)
    whole = execute(sc, tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        execute(sc, tmp_path / "cut", stop_after=3)
    resumed = execute(sc, tmp_path / "cut", restore=latest_checkpoint(tmp_path / "cut"))
    assert strip_wall(resumed) == strip_wall(whole)


class FailingFromRound3(InlineGrid):
    """Every training message of round 3 and later fails (a federation that went away)."""

    def handle(self, msg):
        from fedopt import transport

        parts = (
            transport.unpack_content(msg.content).values()
            if transport.is_pack(msg.content)
            else [msg.content]
        )
        rounds = [int(p["config"].get("server-round", 0)) for p in parts if "config" in p]
        if msg.metadata.message_type == "train" and max(rounds, default=0) >= 3:
            return self.fail(msg)
        return super().handle(msg)

    def fail(self, msg):
        from flwr.app import Error, Message

        return Message(Error(code=0, reason="node lost"), reply_to=msg)


def test_a_failed_run_names_its_newest_checkpoint(tmp_path):
    from fedopt.errors import RunError
    from fedopt.simulation import execute_run

    sc = scenario_with(RAW, run__checkpoint_every=1, run__rounds=6)
    clientapp._RESIDENT = clientapp._ResidentRuntime()
    task = build_task(sc)
    raw = sc.to_dict()
    grid = FailingFromRound3(make_client_app(lambda ctx: {"": raw}), task.num_clients)
    with pytest.raises(RunError, match="round 3: 0 of 4 clients replied") as info:
        execute_run(grid, task, tmp_path)
    assert latest_checkpoint(tmp_path).round == 2
    assert f"round 2; continue from it with: fedopt resume {tmp_path}" in info.value.__notes__[0]
    assert (tmp_path / "summary.json").exists()
