"""Clients called directly as app(msg, context): the ClientApp adapter and the SGD client."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from inline import set_task_identity

from fedopt.client import ClientState
from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.registry import CLIENTS, load_builtins
from fedopt.task import build_task

load_builtins()

RAW = {
    "name": "clients",
    "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
    "partition": {"num_clients": 4, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 2, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 1, "seed": 3},
}


@pytest.fixture(scope="module")
def setup():
    set_task_identity()
    scenario = parse_scenario(RAW)
    task = build_task(scenario)
    app = make_client_app(lambda ctx: {"": RAW})
    return scenario, task, app


def context(node_id=5, partition=0):
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def message(task, cid, *, kind=MessageType.TRAIN, **config):
    arrays = ArrayRecord(task.new_model().state_dict())
    cfg = ConfigRecord({"cid": cid, "server-round": 1, **config})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=5, message_type=kind)


def test_train_reply_carries_model_and_metrics(setup):
    _, task, app = setup
    train, _ = task.client_data(2)
    reply = app(message(task, 2), context())
    m = reply.content["metrics"]
    assert m["num-examples"] == len(train)
    assert m["cid"] == 2
    assert m["work"] == 2 * len(train)  # two epochs over every example
    assert m["steps"] == 2 * int(np.ceil(len(train) / 8))
    assert 0.0 <= m["train_accuracy"] <= 1.0 and np.isfinite(m["train_loss"])
    out = reply.content["arrays"].to_torch_state_dict()
    before = task.new_model().state_dict()
    assert set(out) == set(before)
    assert any(not np.array_equal(out[k].numpy(), before[k].numpy()) for k in out)


def test_cid_comes_from_config_not_node(setup):
    _, task, app = setup
    a = app(message(task, 1), context(partition=3))
    assert a.content["metrics"]["cid"] == 1
    assert a.content["metrics"]["num-examples"] == len(task.client_data(1)[0])


def test_same_message_gives_bitwise_same_update(setup):
    _, task, app = setup
    a = app(message(task, 0), context()).content["arrays"].to_numpy_ndarrays()
    b = app(message(task, 0), context()).content["arrays"].to_numpy_ndarrays()
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_other_round_or_client_gives_other_update(setup):
    _, task, app = setup
    a = app(message(task, 0), context()).content["arrays"].to_numpy_ndarrays()
    msg = message(task, 0)
    msg.content["config"]["server-round"] = 2
    b = app(msg, context()).content["arrays"].to_numpy_ndarrays()
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_proximal_mu_pulls_toward_the_global_model(setup):
    _, task, app = setup
    start = [v.numpy() for v in task.new_model().state_dict().values()]

    def distance(reply):
        arrays = reply.content["arrays"].to_numpy_ndarrays()
        return sum(float(((a - s) ** 2).sum()) for a, s in zip(arrays, start, strict=True))

    free = distance(app(message(task, 0), context()))
    prox = distance(app(message(task, 0, **{"proximal-mu": 5.0}), context()))
    assert prox < free


def test_evaluate_uses_the_client_test_split(setup):
    _, task, app = setup
    _, test = task.client_data(3)
    reply = app(message(task, 3, kind=MessageType.EVALUATE), context())
    m = reply.content["metrics"]
    assert m["num-examples"] == len(test) > 0
    assert 0.0 <= m["eval_accuracy"] <= 1.0


def test_client_state_is_namespaced_per_run_and_client():
    from flwr.app import MetricRecord

    state = RecordDict()
    a = ClientState(state, 1, run_key="r1")
    b = ClientState(state, 2, run_key="r1")
    c = ClientState(state, 1, run_key="r2")
    a.set("acct", MetricRecord({"steps": 3}))
    assert "acct" in a and "acct" not in b and "acct" not in c
    assert a.get("acct")["steps"] == 3 and b.get("acct") is None
    assert sorted(state) == ["r1/client1/acct"]


@pytest.mark.parametrize("name", CLIENTS.names())
def test_contract_every_client_trains_on_its_own_data(name):
    set_task_identity()
    requires = getattr(CLIENTS.get(name).obj, "requires", {})  # its paired strategy, if any
    raw = {**RAW, **requires, "client": {"name": name}}
    scenario = parse_scenario(raw)
    task = build_task(scenario)
    app = make_client_app(lambda ctx: {"": raw})
    reply = app(message(task, 1), context())
    assert not reply.has_error()
    m = reply.content["metrics"]
    assert m["num-examples"] == len(task.client_data(1)[0]) and m["work"] > 0


def test_local_lr_in_round_config_overrides_the_scenario_rate(setup):
    _, task, app = setup
    base = app(message(task, 0), context()).content["arrays"].to_numpy_ndarrays()
    same = (
        app(message(task, 0, **{"local-lr": 0.1}), context()).content["arrays"].to_numpy_ndarrays()
    )
    other = (
        app(message(task, 0, **{"local-lr": 0.01}), context()).content["arrays"].to_numpy_ndarrays()
    )
    assert all(np.array_equal(a, b) for a, b in zip(base, same, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(base, other, strict=True))


def test_registered_client_mods_wrap_the_handlers(setup):
    from fedopt.registry import CLIENT_MODS

    _, task, _ = setup
    calls = []

    def tag(msg, ctx, call_next):
        calls.append(msg.metadata.message_type)
        return call_next(msg, ctx)

    CLIENT_MODS.register("test_tag", lambda scenario: [tag] if scenario.name == "clients" else [])
    try:
        raw2 = {**RAW, "name": "other"}
        app = make_client_app(lambda ctx: {"a": RAW, "b": raw2})
        msg = message(task, 0)
        msg.content["config"]["run-key"] = "a"
        app(msg, context())
        msg = message(task, 0)
        msg.content["config"]["run-key"] = "b"
        app(msg, context())
    finally:
        CLIENT_MODS.unregister("test_tag")
    assert calls == ["train"]
