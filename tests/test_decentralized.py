"""Decentralized training: the node client, the relay loop, the final merge, BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from inline import InlineGrid, set_task_identity
from torch import nn

from clients.decentralized import MODEL_RECORD, OPTIMIZER_RECORD, recalibrate_batchnorm
from fedopt import topology as tp
from fedopt.client import ClientState
from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.registry import OPTIMIZERS, load_builtins
from fedopt.task import as_tensors, build_task, derive_seed
from strategies.decentralized import DecentralizedDriver

load_builtins()

RAW = {
    "name": "dec",
    "data": {"name": "blobs", "num_examples": 400, "num_features": 6},
    "partition": {"num_clients": 4, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [8]},
    "client": {"name": "decentralized", "steps": 3, "batch_size": 8, "lr": 0.1, "momentum": 0.9},
    "strategy": {"name": "decentralized", "topology": "ring"},
    "run": {"rounds": 3, "seed": 2, "fed_eval_every": 0},
}


def bn_mlp(input_shape, num_classes, *, width=6):
    """A tiny model with BatchNorm (the reference models use GroupNorm)."""
    n = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def raw_with(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in RAW.items()}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def run_dec(raw, *, run_key=""):
    scenario = parse_scenario(raw)
    task = build_task(scenario)
    grid = InlineGrid(make_client_app(lambda ctx: {run_key: raw}), task.num_clients)
    rows = []
    driver = DecentralizedDriver(task, emit=rows.append, run_key=run_key)
    result = driver.run(grid)
    return rows, driver, grid, result


def stored(driver, grid, cid, name=MODEL_RECORD):
    ctx = grid.contexts[driver.transport.node_of(cid)]
    return ClientState(ctx.state, cid).get(name)


def numpy_of(record):
    return {k: a.numpy() for k, a in record.items()}


def test_strategy_and_client_must_come_together():
    with pytest.raises(ConfigError) as err:
        parse_scenario(raw_with(client={"name": "sgd", "steps": 3}))
    assert err.value.key == "client.name" and "decentralized" in err.value.allowed
    with pytest.raises(ConfigError) as err:
        parse_scenario({**RAW, "strategy": {"name": "fedavg"}})
    assert err.value.key == "strategy.name"
    with pytest.raises(ConfigError) as err:
        parse_scenario(raw_with(run={"clients_per_round": 2}))
    assert err.value.key == "run.clients_per_round"


def test_ring_run_rows_bytes_final_merge_and_replay():
    rows, driver, grid, result = run_dec(RAW)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["gossip_peers"] for r in rows[1:]] == [0.0, 2.0, 2.0]
    for r in rows[1:3]:  # before the merge the run's accuracy is the nodes' mean
        assert r["central_accuracy"] == r["node_accuracy_mean"]
        assert r["merge_gap"] == pytest.approx(r["merged_accuracy"] - r["node_accuracy_mean"])
    final = rows[-1]
    assert final["central_accuracy"] == final["merged_accuracy"]
    # gossip bytes: exactly the peer models relayed in that round (nothing else, no optimizer state)
    model_keys = set(driver.model.state_dict())
    for t in (2, 3):
        sent = [m for m in grid.sent if m.content["config"]["server-round"] == t]
        peers = [(k, rec) for m in sent for k, rec in m.content.items() if k.startswith("peer/")]
        assert len(peers) == 8 and all(set(rec.keys()) == model_keys for _, rec in peers)
        size = sum(recorddict_to_proto(RecordDict({k: rec})).ByteSize() for k, rec in peers)
        assert rows[t]["gossip_bytes"] == pytest.approx(size, abs=8)
    # the final merge: every node adopted the merged model, which is the run's result
    for cid in range(4):
        for key, value in stored(driver, grid, cid).items():
            np.testing.assert_array_equal(value.numpy(), result[key].numpy())
    summary = driver.summary_extra()
    assert summary["merged_accuracy_final"] == final["merged_accuracy"]
    assert summary["bytes_per_node"] == final["bytes_per_node"] > 0
    again, *_ = run_dec(RAW)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in again]


def test_no_communication_sends_no_peer_models_and_counterfactual_merges_change_nothing():
    raw = raw_with(strategy={"schedule": "none", "final_merge": False})
    rows, driver, grid, _ = run_dec(raw)
    assert not any(k.startswith("peer/") for m in grid.sent for k in m.content.keys())
    assert all(r["gossip_bytes"] == 0 for r in rows[1:]) and rows[-1]["bytes_per_node"] == 0
    assert all("merged_accuracy" in r for r in rows)
    assert rows[-1]["central_accuracy"] == rows[-1]["node_accuracy_mean"]
    models = [numpy_of(stored(driver, grid, c)) for c in range(4)]
    assert tp.consensus_distance(models) == pytest.approx(rows[-1]["consensus_distance"])
    assert rows[-1]["consensus_distance"] > 0  # nobody was handed the merged model


def test_final_merge_of_identical_models_is_the_identity():
    set_task_identity()
    scenario = parse_scenario(RAW)
    task = build_task(scenario)
    driver = DecentralizedDriver(task, emit=lambda row: None)
    arrays = ArrayRecord(task.new_model().state_dict())
    replies = {
        k: RecordDict(
            {"arrays": arrays, "metrics": _metrics({tp.MERGE_WEIGHT_KEY: 1.0, "num-examples": 9})}
        )
        for k in range(4)
    }
    merged = driver.strategy.merge([replies[k] for k in range(4)])
    for key, value in arrays.items():
        np.testing.assert_allclose(merged[key].numpy(), value.numpy(), rtol=1e-7, atol=0)
    grid = InlineGrid(make_client_app(lambda ctx: {"": scenario.to_dict()}), 4)
    driver.connect(grid)
    out, down, up = driver.merge(grid, 3, _as_messages(replies), arrays, adopt=True)
    assert down > 0 and up > 0
    for cid in range(4):  # every node now holds the merged model
        for key, value in stored(driver, grid, cid).items():
            np.testing.assert_array_equal(value.numpy(), out[key].numpy())


def _metrics(values):
    return MetricRecord(values)


def _as_messages(contents):
    set_task_identity()
    out = {}
    for k, content in contents.items():
        msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="train")
        out[k] = Message(content, reply_to=msg)
    return out


def _node_call(app, task, ctx, cid, server_round, **config):
    content = RecordDict()
    peers = config.pop("peers", {})
    cfg = {"cid": cid, "server-round": server_round, **config}
    if peers:
        cfg[tp.PEERS_KEY] = sorted(peers)
        cfg[tp.WEIGHTS_KEY] = [peers[p][0] for p in sorted(peers)]
        for p in sorted(peers):
            content[tp.peer_key(p)] = peers[p][1]
    content["config"] = ConfigRecord(cfg)
    if server_round == 1:
        content["arrays"] = ArrayRecord(task.new_model().state_dict())
    msg = Message(content, dst_node_id=ctx.node_id, message_type=MessageType.TRAIN)
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply.content


def _nodes(raw, m):
    set_task_identity()
    scenario = parse_scenario(raw)
    task = build_task(scenario)
    app = make_client_app(lambda ctx: {"": raw})
    contexts = [
        Context(
            run_id=1,
            node_id=10 + k,
            node_config={"partition-id": k, "num-partitions": m},
            state=RecordDict(),
            run_config={},
        )
        for k in range(m)
    ]
    return scenario, task, app, contexts


def test_complete_graph_gossip_on_a_node_equals_flower_averaging():
    raw = raw_with(partition={"num_clients": 3})
    _, task, app, ctxs = _nodes(raw, 3)
    first = [_node_call(app, task, ctxs[k], k, 1)["arrays"] for k in range(3)]
    assert not np.array_equal(first[0]["1.weight"].numpy(), first[1]["1.weight"].numpy())
    # a rate of 1e-30 leaves float32 weights untouched: the reply is the mixed model itself
    out = _node_call(
        app, task, ctxs[0], 0, 2, peers={1: (1 / 3, first[1]), 2: (1 / 3, first[2])},
        **{tp.SELF_WEIGHT_KEY: 1 / 3, "local-lr": 1e-30},
    )  # fmt: skip
    contents = [
        RecordDict({"arrays": a, "metrics": _metrics({"merge-weight": 1.0})}) for a in first
    ]
    mean = aggregate_arrayrecords(contents, "merge-weight")
    mixed = tp.mix([numpy_of(a) for a in first], [1 / 3] * 3)
    for key in mean.keys():
        np.testing.assert_allclose(out["arrays"][key].numpy(), mean[key].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(out["arrays"][key].numpy(), mixed[key])
    assert out["metrics"]["peers"] == 2


def test_optimizer_state_stays_on_its_node_and_is_never_mixed():
    raw = raw_with(partition={"num_clients": 2}, client={"steps": 1})
    scenario, task, app, ctxs = _nodes(raw, 2)
    first = [_node_call(app, task, ctxs[k], k, 1)["arrays"] for k in range(2)]
    buf = [ClientState(ctxs[k].state, k).get(OPTIMIZER_RECORD) for k in range(2)]
    assert set(buf[0].keys()) == {f"{i}/momentum_buffer" for i in range(4)}
    assert not np.array_equal(
        buf[0]["0/momentum_buffer"].numpy(), buf[1]["0/momentum_buffer"].numpy()
    )
    before = {k: a.numpy().copy() for k, a in buf[0].items()}
    _node_call(app, task, ctxs[0], 0, 2, peers={1: (0.5, first[1])}, **{tp.SELF_WEIGHT_KEY: 0.5})
    after = ClientState(ctxs[0].state, 0).get(OPTIMIZER_RECORD)
    # reference: mix the models only, continue node 0's own momentum for one step
    model = task.new_model()
    mixed = tp.mix([numpy_of(first[0]), numpy_of(first[1])], [0.5, 0.5])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in mixed.items()})
    params = list(model.parameters())
    opt = OPTIMIZERS.get("sgd").obj(params, scenario.client.params)
    state = {
        i: {"momentum_buffer": torch.from_numpy(before[f"{i}/momentum_buffer"])} for i in range(4)
    }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    x, y = as_tensors(task.client_data(0)[0], torch.device("cpu"))
    gen = torch.Generator().manual_seed(derive_seed(scenario.run.seed, 2, 0, 1))
    idx = torch.randperm(len(x), generator=gen)[:8]
    F.cross_entropy(model(x[idx]), y[idx].long()).backward()
    opt.step()
    for i in range(4):
        expect = opt.state[params[i]]["momentum_buffer"].numpy()
        np.testing.assert_array_equal(after[f"{i}/momentum_buffer"].numpy(), expect)
    node_model = ClientState(ctxs[0].state, 0).get(MODEL_RECORD)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(node_model[key].numpy(), value.numpy())


def test_batchnorm_statistics_are_reestimated_after_the_merge():
    raw = raw_with(run={"rounds": 2})
    raw["model"] = {"name": "test_decentralized:bn_mlp"}
    rows, driver, grid, result = run_dec(raw)
    assert driver.has_batchnorm
    task = driver.task
    model = task.new_model()
    model.load_state_dict(result.to_torch_state_dict())
    bn = model[2]
    bn.reset_running_stats()
    bn.momentum = None
    model.train()
    with torch.no_grad():
        for cid in range(4):
            x, _ = as_tensors(task.client_data(cid)[0], torch.device("cpu"))
            for start in range(0, len(x), 8):
                if len(x[start : start + 8]) > 1:
                    model(x[start : start + 8])
    np.testing.assert_allclose(result["2.running_mean"].numpy(), bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(result["2.running_var"].numpy(), bn.running_var.numpy(), rtol=1e-5)
    assert int(result["2.num_batches_tracked"].numpy()) == int(bn.num_batches_tracked)
    assert rows[-1]["central_accuracy"] == driver.central_eval(result)["central_accuracy"]


def test_recalibration_restores_the_layer_and_skips_models_without_batchnorm():
    model = bn_mlp((4,), 3)
    x = torch.randn(9, 4)
    stats, batches = recalibrate_batchnorm(model, x, batch_size=4)  # 4 + 4, the last 1 skipped
    assert batches == 2 and model[2].momentum == 0.1 and model.training
    np.testing.assert_allclose(stats["2.running_mean"], model[2].running_mean.numpy())
    assert recalibrate_batchnorm(nn.Linear(4, 3), x, batch_size=4) == ({}, 0)


@pytest.mark.slow
def test_ray_engine_replays_the_inline_run(tmp_path):
    import fedopt

    scenario = parse_scenario(RAW)
    rows, *_ = run_dec(RAW, run_key=f"0-{scenario.fingerprint()}")  # the key fedopt.run uses
    result = fedopt.run(scenario, out=tmp_path)
    assert result.summary["status"] == "completed"
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in result.rows] == strip
    assert result.summary["merged_accuracy_final"] == rows[-1]["merged_accuracy"]
    assert (result.run_dir / "node_vs_merged_accuracy.png").exists()
