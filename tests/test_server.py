"""The round loop with an in-process grid: selection, bytes, clock, faults, divergence."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto
from inline import InlineGrid, run_inline, scenario_with, strip_wall

from fedopt.clientapp import make_client_app
from fedopt.errors import DivergenceError, RunError
from fedopt.heterogeneity import client_speeds
from fedopt.records import ByteCounter
from fedopt.server import RoundDriver, worst_fraction_mean
from fedopt.task import build_task

RAW = {
    "name": "server",
    "data": {"name": "blobs", "num_examples": 600, "num_features": 10},
    "partition": {"num_clients": 6, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 16, "lr": 0.2},
    "heterogeneity": {"speed": "fx", "spread": 50.0, "base_rate": 10.0},
    "run": {"rounds": 3, "seed": 1, "fed_eval_every": 1},
}


def scenario(**sets):
    return scenario_with(RAW, **sets)


def test_rows_have_the_documented_schema():
    rows, driver, _ = run_inline(scenario())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {
        "round",
        "sim_time",
        "cum_bytes",
        "central_loss",
        "central_accuracy",
        "wall_time",
    }
    r = rows[1]
    for key in (
        "num_clients",
        "clients",
        "bytes_down",
        "bytes_up",
        "cum_bytes",
        "sim_time",
        "round_sim_time",
        "train_loss",
        "train_accuracy",
        "central_accuracy",
        "fed_accuracy",
        "fed_accuracy_worst10",
        "fed_loss",
        "per_client",
    ):
        assert key in r, key
    assert r["clients"] == list(range(6)) and r["num_clients"] == 6
    assert rows[-1]["central_accuracy"] > 0.6
    assert driver.client_devices == {"cpu"}


def test_results_do_not_depend_on_reply_order():
    a, _, _ = run_inline(scenario())
    b, _, _ = run_inline(scenario())
    assert strip_wall(a) == strip_wall(b)  # InlineGrid returns replies in reverse order


def test_virtual_clock_round_lasts_its_slowest_client():
    s = scenario()
    rows, _, _ = run_inline(s)
    speeds = client_speeds("fx", s.heterogeneity.params, num_clients=6, seed=1)
    r = rows[1]
    durations = {int(c): d["sim_duration"] for c, d in r["per_client"].items()}
    task = build_task(s)
    for cid, d in durations.items():
        n = len(task.client_data(cid)[0])
        assert d == pytest.approx(n / (10.0 * speeds[cid]))
    assert r["round_sim_time"] == pytest.approx(max(durations.values()))
    assert rows[-1]["sim_time"] == pytest.approx(sum(x["round_sim_time"] for x in rows[1:]))


def test_bytes_are_the_serialised_record_sizes():
    rows, _, grid = run_inline(scenario(run__fed_eval_every=0))
    first = [m for m in grid.sent if m.metadata.message_type == "train"][:6]
    expected = sum(recorddict_to_proto(m.content).ByteSize() for m in first)
    assert rows[1]["bytes_down"] == expected
    assert rows[1]["cum_bytes"] == rows[1]["bytes_down"] + rows[1]["bytes_up"]
    per = rows[1]["per_client"]
    assert sum(p["bytes_down"] for p in per.values()) == expected
    counter = ByteCounter()
    content = first[0].content
    assert counter.content_size(content) == recorddict_to_proto(content).ByteSize()
    assert counter.content_size(RecordDict()) == 0


def test_clients_per_round_and_availability_are_seeded():
    rows, _, _ = run_inline(
        scenario(run__clients_per_round=2, heterogeneity__availability=0.5, run__rounds=5)
    )
    chosen = [r["clients"] for r in rows[1:]]
    assert all(len(c) <= 2 for c in chosen)
    again, _, _ = run_inline(
        scenario(run__clients_per_round=2, heterogeneity__availability=0.5, run__rounds=5)
    )
    assert chosen == [r["clients"] for r in again[1:]]
    assert len({tuple(c) for c in chosen}) > 1


def test_failed_client_is_dropped_and_logged(caplog):
    s = scenario(run__fed_eval_every=0)
    task = build_task(s)
    raw = s.to_dict()
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}), 6)
    rows = []
    driver = RoundDriver(task, emit=rows.append)
    grid.fail_cids = {2}
    with caplog.at_level(logging.WARNING, logger="fedopt"):
        driver.run(grid)
    assert rows[1]["failed_clients"] == [2] and rows[1]["clients"] == [0, 1, 3, 4, 5]
    assert "client 2 dropped" in caplog.text and "injected failure" in caplog.text


def test_too_few_replies_stop_the_run():
    s = scenario(run__min_replies=6, run__fed_eval_every=0)
    raw = s.to_dict()
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}), 6)
    grid.fail_cids = {0}
    rows = []
    with pytest.raises(RunError, match="5 of 6 clients replied"):
        RoundDriver(build_task(s), emit=rows.append).run(grid)
    assert [r["round"] for r in rows] == [0]


def test_divergence_names_round_and_clients():
    s = scenario(client__lr=1e30, run__fed_eval_every=0)
    rows = []
    raw = s.to_dict()
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}), 6)
    with pytest.raises(DivergenceError) as info:
        RoundDriver(build_task(s), emit=rows.append).run(grid)
    assert info.value.round >= 1 and info.value.clients
    assert "diverged in round" in str(info.value)
    assert rows[0]["round"] == 0


def test_too_few_nodes_is_a_clear_error():
    s = scenario(run__pack="off")
    raw = s.to_dict()
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}), 4)
    with pytest.raises(RunError, match="num-supernodes=6"):
        RoundDriver(build_task(s), emit=lambda r: None, node_patience=0.2).run(grid)


def test_worst_fraction_mean():
    assert worst_fraction_mean([0.9, 0.1, 0.5], fraction=0.1) == 0.1
    vals = list(np.linspace(0, 1, 20))
    assert worst_fraction_mean(vals, fraction=0.1) == pytest.approx(np.mean(vals[:2]))
    assert np.isnan(worst_fraction_mean([]))


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
    ],
)
def test_every_strategy_runs_rounds_inline(name):
    rows, _, _ = run_inline(scenario(strategy__name=name, run__rounds=2, run__fed_eval_every=0))
    assert len(rows) == 3 and all(np.isfinite(r["central_loss"]) for r in rows)


def test_server_optimizers_keep_the_model_dtype_on_the_wire():
    plain, _, _ = run_inline(scenario(run__rounds=2, run__fed_eval_every=0))
    adam, _, grid = run_inline(
        scenario(strategy__name="fedadam", run__rounds=2, run__fed_eval_every=0)
    )
    assert adam[2]["bytes_down"] == plain[2]["bytes_down"]
    last = [m for m in grid.sent if m.metadata.message_type == "train"][-1]
    assert {a.dtype for a in last.content["arrays"].values()} == {"float32"}


def test_metric_stats_and_wrappers_hooks():
    from flwr.app import ArrayRecord

    from clients.sgd import SGDClient
    from fedopt.client import ClientUpdate
    from fedopt.registry import CLIENTS, WRAPPERS
    from fedopt.training import LocalTrainConfig

    class Counting(SGDClient):
        """Reports a running count per client and a per-round value."""

        metric_stats = {"visits": "latest", "noise": "round"}

        def fit(self, job):
            up = super().fit(job)
            seen = job.state.get("visits")
            visits = (seen["n"] if seen is not None else 0) + 1
            from flwr.app import MetricRecord

            job.state.set("visits", MetricRecord({"n": visits}))
            extra = {"visits": visits, "noise": float(job.cid)}
            return ClientUpdate(
                ArrayRecord(job.model.state_dict()),
                up.num_examples,
                up.work,
                {**up.metrics, **extra},
            )

    wrapped = []

    def wrap(strategy, *, scenario):
        wrapped.append(type(strategy).__name__)
        return strategy

    CLIENTS.register("test_counting", Counting, params=LocalTrainConfig, replace=True)
    WRAPPERS.register("test_wrap", wrap, replace=True)
    try:
        s = scenario(client__name="test_counting", run__clients_per_round=3, run__fed_eval_every=0)
        rows, driver, _ = run_inline(s)
    finally:
        CLIENTS.unregister("test_counting")
        WRAPPERS.unregister("test_wrap")
    assert wrapped == ["FedAvg"]
    r1 = rows[1]
    assert r1["noise_min"] == min(r1["clients"]) and r1["noise_max"] == max(r1["clients"])
    assert r1["visits_max"] == 1.0
    seen = {}
    for r in rows[1:]:
        for c in r["clients"]:
            seen[c] = seen.get(c, 0) + 1
    assert rows[-1]["visits_max"] == max(seen.values())
    assert rows[-1]["visits_mean"] == pytest.approx(np.mean(list(seen.values())))
    assert driver.summary_extra()["clients_final"]["visits"] == {
        str(c): float(n) for c, n in sorted(seen.items())
    }
    assert r1["per_client"][str(r1["clients"][0])]["visits"] == 1.0
