"""Partial sums: packs send group sums for linear strategies; the mean is layout-independent."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian
from inline import run_inline, scenario_with, set_task_identity, strip_wall

from fedopt import partial
from fedopt.errors import ConfigError

RAW = {
    "name": "partial",
    "data": {"name": "blobs", "num_examples": 600, "num_features": 8},
    "partition": {"name": "dirichlet", "num_clients": 9, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 3, "seed": 2, "clients_per_round": 7, "fed_eval_every": 0},
}


def reply(values, weight):
    arrays = ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": weight})})


def instruction():
    set_task_identity()
    return Message(RecordDict(), dst_node_id=1, message_type="train")


def test_the_mean_of_group_sums_is_the_exact_weighted_mean():
    replies = {4: reply([1.0, 2.0], 1), 1: reply([3.0, 5.0], 3), 2: reply([0.5, -1.0], 4)}
    sums = partial.group_sums(replies, groups=2)
    assert sorted(sums) == [0, 1]
    assert sums[0].weight == 5 and sums[1].weight == 3
    np.testing.assert_array_equal(sums[0].sums["w"], [1.0 * 1 + 0.5 * 4, 2.0 - 4.0])
    like = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    mean = partial.mean_reply(sums.items(), MetricRecord(), like=like, reply_to=instruction())
    out = mean.content["arrays"]["w"].numpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.float32([(1 + 9 + 2) / 8, (2 + 15 - 4) / 8]))
    assert mean.content["metrics"]["num-examples"] == 8


def test_a_reduced_pack_keeps_every_clients_metrics_and_reply_size():
    from fedopt.records import ByteCounter

    replies = {3: reply([1.0, 2.0], 2), 5: reply([3.0, 4.0], 6)}
    per_client, sums = partial.split_reduced(partial.reduced_content(replies, groups=2))
    assert sorted(per_client) == [3, 5] and list(sums) == [1]
    assert sums[1].weight == 8
    np.testing.assert_array_equal(sums[1].sums["w"], [2.0 + 18.0, 4.0 + 24.0])
    for cid, content in per_client.items():
        assert content["metrics"]["num-examples"] == replies[cid]["metrics"]["num-examples"]
        assert partial.reported_size(content) == ByteCounter().content_size(replies[cid])


def test_no_examples_at_all_is_refused():
    like = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    sums = partial.group_sums({0: reply([1.0, 1.0], 0)}, groups=4)
    with pytest.raises(ValueError, match="0 examples"):
        partial.mean_reply(sums.items(), MetricRecord(), like=like, reply_to=instruction())


def test_linear_is_declared_by_exact_type():
    class Reweighted(FedAvg):
        """FedAvg under another name: not linear until it says so."""

    assert partial.is_linear(FedAvg()) and not partial.is_linear(FedMedian())
    assert not partial.is_linear(Reweighted())  # a subclass may aggregate differently
    partial.register_linear(Reweighted)
    try:
        assert partial.is_linear(Reweighted())
        assert not partial.is_linear(Reweighted(weighted_by_key="other"))
    finally:
        partial.LINEAR_STRATEGIES.discard(Reweighted)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_results_do_not_depend_on_nodes_or_packing(strategy):
    raw = {**RAW, "strategy": {"name": strategy}}
    rows = [
        strip_wall(run_inline(scenario_with(raw, run__pack=pack, run__pack_nodes=n))[0])
        for pack, n in [("off", None), ("on", 1), ("on", 2), ("on", 4)]
    ]
    assert all(r == rows[0] for r in rows[1:])
    assert len(rows[0]) == 4


def test_packs_send_group_sums_not_models():
    sc = scenario_with(RAW, run__pack="on", run__pack_nodes=3, run__sum_groups=2)
    _, driver, grid = run_inline(sc)
    assert len(driver.transport.nodes) == 2  # at most one node per sum group
    train = [r for r in grid.received if partial.is_reduced(r.content)]
    assert len(train) == 2 * RAW["run"]["rounds"]
    for r in train:
        assert "arrays" not in r.content
        assert sum(isinstance(v, ArrayRecord) for v in r.content.values()) == 1


def test_a_strategy_that_is_not_linear_gets_every_model():
    sc = scenario_with(
        {**RAW, "strategy": {"name": "fedmedian"}}, run__pack="on", run__pack_nodes=2
    )
    _, _, grid = run_inline(sc)
    assert not any(partial.is_reduced(r.content) for r in grid.received)
    assert any("arrays" in r.content for r in grid.received)


def test_partial_sums_agree_with_flowers_own_aggregation():
    on, driver, _ = run_inline(scenario_with(RAW, run__pack="on", run__pack_nodes=2))
    off, flower, _ = run_inline(
        scenario_with(RAW, run__pack="on", run__pack_nodes=2, run__partial_sums=False)
    )
    assert driver.sum_groups() == 64 and flower.sum_groups() == 0
    for a, b in zip(on[1:], off[1:], strict=True):
        assert a["clients"] == b["clients"]
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
        assert {c: v["bytes_up"] for c, v in a["per_client"].items()} == {
            c: v["bytes_up"] for c, v in b["per_client"].items()
        }
        assert a.get("central_loss", 0.0) == pytest.approx(b.get("central_loss", 0.0), rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_sum_groups_must_be_positive():
    with pytest.raises(ConfigError, match="sum_groups"):
        scenario_with(RAW, run__sum_groups=0)


def test_weighted_metrics_are_bitwise_flowers():
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    rng = np.random.default_rng(3)
    records = [
        MetricRecord(
            {
                "num-examples": int(rng.integers(1, 90)),
                "cid": c,
                "train_loss": float(rng.random()),
                "curve": [float(v) for v in rng.random(3)],
            }
        )
        for c in range(11)
    ]
    ours = partial.weighted_metrics(records)
    theirs = aggregate_metricrecords([RecordDict({"m": r}) for r in records], "num-examples")
    assert dict(ours) == dict(theirs) and "num-examples" not in ours
