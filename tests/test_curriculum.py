"""Curricula in FL: pacing, orderings, the paced stream, scoring, the client scheduler, privacy."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from inline import run_inline, set_task_identity

from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.curriculum import (
    LOCAL_MODEL_RECORD,
    DataCurriculum,
    example_scores,
    order_indices,
    pace,
    paced_batches,
    paced_step_count,
    train_expert,
)
from fedopt.errors import ConfigError
from fedopt.registry import load_builtins
from fedopt.server import build_strategy
from fedopt.task import as_tensors, build_task
from fedopt.training import LocalTrainConfig, evaluate, train_local
from strategies.curriculum import ClientScheduler

load_builtins()

RAW = {
    "name": "curr",
    "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
    "partition": {"num_clients": 4, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 2, "seed": 3, "fed_eval_every": 0},
}


def scenario(**sections):
    raw = copy.deepcopy(RAW)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_scenario(raw)


# -- pacing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "t", "expected"),
    [
        ("linear", 0, 20),
        ("linear", 4, 60),  # 20 + 80 * 4/8
        ("linear", 8, 100),
        ("linear", 10, 100),  # 120, clipped to N
        ("quad", 4, 40),  # 20 + 80 * (1/2)^2
        ("root", 2, 60),  # 20 + 80 * (1/4)^(1/2)
        ("step", 4, 20),  # 20 + 100 * floor(1/2)
        ("step", 8, 100),  # 120, clipped
        ("exp", 4, 20),  # 20 + 80 * (e^5 - 1)/(e^10 - 1) = 20.54
        ("exp", 8, 100),
        ("log", 0, 20),  # 20 + 80 * (1 + ln(e^-10)/10)
        ("log", 4, 94),  # 20 + 80 * (1 + ln(0.5 + e^-10)/10) = 94.46
    ],
)
def test_pacing_functions_match_hand_values(name, t, expected):
    assert pace(name, t, a=0.8, b=0.2, total=10, n=100) == expected


def test_pacing_takes_at_least_one_batch_and_at_most_everything():
    assert pace("linear", 0, a=0.5, b=0.0, total=10, n=100) == 1
    assert pace("linear", 0, a=0.5, b=0.0, total=10, n=100, minimum=16) == 16
    assert pace("linear", 0, a=0.5, b=0.0, total=10, n=5, minimum=16) == 5
    exact = 20 + 80 * (1 + math.log(0.25 + math.exp(-10)) / 10)
    assert pace("log", 2, a=0.8, b=0.2, total=10, n=100) == int(exact)


# -- orderings ----------------------------------------------------------------------------
def test_orderings_give_the_expected_permutations():
    scores = torch.tensor([0.3, 0.1, 0.5, 0.1])
    gen = torch.Generator().manual_seed(0)
    assert order_indices(scores, "curriculum", generator=gen).tolist() == [1, 3, 0, 2]
    assert order_indices(scores, "anti", generator=gen).tolist() == [2, 0, 1, 3]
    got = order_indices(scores, "random", generator=torch.Generator().manual_seed(5))
    assert got.tolist() == torch.randperm(4, generator=torch.Generator().manual_seed(5)).tolist()


def test_paced_stream_draws_each_pass_from_the_current_prefix():
    order = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    sizes = {0: 4, 2: 6, 5: 10}
    stream = list(
        paced_batches(
            order,
            steps=7,
            batch_size=2,
            size_at=lambda t: sizes[t],
            generator=torch.Generator().manual_seed(1),
        )
    )
    assert len(stream) == 7
    first, second, third = stream[0:2], stream[2:5], stream[5:7]
    assert sorted(torch.cat(first).tolist()) == [6, 7, 8, 9]
    assert sorted(torch.cat(second).tolist()) == [4, 5, 6, 7, 8, 9]
    assert set(torch.cat(third).tolist()) <= set(range(10))


def test_finish_pass_counts_the_authors_steps():
    # The paper's setting: N = 500 examples a client, batch 10, T = (500 // 10 + 1) * 1 = 51,
    # linear a = 0.8, b = 0.2: g(t) = 100 + 400 t / 40.8. Passes start at t = 0, 10, 30
    # with prefixes 100, 198, 394 (10, 20, 40 batches): 70 steps = 1.37 T, and the last
    # pass covers the easiest 394 / 500 = 79% fully.
    def size_at(t):
        return pace("linear", t, a=0.8, b=0.2, total=51, n=500, minimum=10)

    count = paced_step_count(steps=51, batch_size=10, size_at=size_at, finish_pass=True)
    assert count == 70
    assert paced_step_count(steps=51, batch_size=10, size_at=size_at, finish_pass=False) == 51
    order = torch.arange(500)
    for finish, expected in ((True, 70), (False, 51)):
        passes = []
        stream = list(
            paced_batches(
                order,
                steps=51,
                batch_size=10,
                size_at=size_at,
                generator=torch.Generator().manual_seed(0),
                finish_pass=finish,
                passes=passes,
            )
        )
        assert len(stream) == expected
        assert passes == [100, 198, 394]
    assert sorted(torch.cat(stream[:10]).tolist()) == list(range(100))
    # with finish_pass the stream stops only at a pass's end: the last 40 batches are the prefix
    full = list(
        paced_batches(
            order,
            steps=51,
            batch_size=10,
            size_at=size_at,
            generator=torch.Generator().manual_seed(0),
            finish_pass=True,
        )
    )
    assert sorted(torch.cat(full[30:]).tolist()) == list(range(394))
    assert [b.tolist() for b in full[:51]] == [b.tolist() for b in stream]


# -- scoring and the train_local hook -----------------------------------------------------
def test_example_scores_are_per_example_loss_and_error():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    logits = model(x).detach()
    loss = example_scores(model, x, y, score="loss", batch_size=3)
    assert torch.allclose(loss, F.cross_entropy(logits, y, reduction="none").double())
    err = example_scores(model, x, y, score="error", batch_size=4)
    assert err.tolist() == (logits.argmax(1) != y).double().tolist()


def test_train_local_follows_the_given_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = copy.deepcopy(model)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    batches = [torch.tensor([0, 5]), torch.tensor([7, 1, 3]), torch.tensor([11])]
    cfg = LocalTrainConfig(epochs=5, batch_size=4, lr=0.1)
    res = train_local(model, x, y, cfg, generator=torch.Generator(), batches=batches)
    assert (res.steps, res.examples_processed) == (3, 6)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


# -- the client half ----------------------------------------------------------------------
def _context(node_id=5):
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _message(arrays, msg_type=MessageType.TRAIN, cid=1):
    config = ConfigRecord({"server-round": 1, "cid": cid})
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type=msg_type
    )


def test_client_scores_under_the_global_model_and_keeps_its_local_model():
    set_task_identity()
    sc = scenario(curriculum={"ordering": "curriculum", "scoring": "local+global"})
    task = build_task(sc)
    raw = sc.to_dict()
    app = make_client_app(lambda ctx: {"": raw})
    model = task.new_model()
    arrays = ArrayRecord(model.state_dict())
    ctx = _context()
    x, y = as_tensors(task.client_data(1)[0], torch.device("cpu"))
    reply = app(_message(arrays), ctx)
    m = reply.content["metrics"]
    # first visit: local falls back to global, so the score is twice the global loss
    assert m["order_score_mean"] == pytest.approx(2 * evaluate(model, x, y).loss, rel=1e-6)
    assert m["steps"] == math.ceil(len(x) / 8)
    assert f"/client1/{LOCAL_MODEL_RECORD}" in ctx.state
    # the server's query: mean of local (just trained) + global losses
    local = task.new_model()
    local.load_state_dict(ctx.state[f"/client1/{LOCAL_MODEL_RECORD}"].to_torch_state_dict())
    q = app(_message(arrays, MessageType.QUERY), ctx).content["metrics"]
    expected = evaluate(model, x, y).loss + evaluate(local, x, y).loss
    assert q["score"] == pytest.approx(expected, rel=1e-6)


def test_ordering_none_replays_the_plain_run_bitwise():
    plain, _, _ = run_inline(scenario())
    none, _, _ = run_inline(scenario(curriculum={"ordering": "none"}))
    ordered, _, _ = run_inline(scenario(curriculum={"ordering": "anti", "pacing": "step"}))
    key = "central_loss"
    assert [r[key] for r in plain] == [r[key] for r in none]
    assert [r[key] for r in plain] != [r[key] for r in ordered]
    again, _, _ = run_inline(scenario(curriculum={"ordering": "anti", "pacing": "step"}))
    assert [r[key] for r in ordered] == [r[key] for r in again]


def test_plain_ordering_is_the_unordered_run_with_the_paced_step_count():
    # without finish_pass, "plain" takes the round's T shuffled steps: the run without a curriculum
    key = "central_loss"
    one = {"rounds": 1, "seed": 3, "fed_eval_every": 0}
    none, _, _ = run_inline(scenario(curriculum={"ordering": "none"}, run=one))
    plain, _, _ = run_inline(scenario(curriculum={"ordering": "plain"}, run=one))
    assert [r[key] for r in plain] == [r[key] for r in none]
    # with finish_pass it takes exactly the steps of the finished paced passes, whatever the order
    set_task_identity()
    steps = {}
    for ordering in ("curriculum", "anti", "random", "plain"):
        sc = scenario(curriculum={"ordering": ordering, "finish_pass": True})
        task = build_task(sc)
        raw = sc.to_dict()
        app = make_client_app(lambda ctx, raw=raw: {"": raw})
        arrays = ArrayRecord(task.new_model().state_dict())
        m = app(_message(arrays), _context()).content["metrics"]
        steps[ordering] = m["steps"], m["curriculum_coverage"]
        assert (m["curriculum_steps"], m["curriculum_step_ratio"]) == (14.0, 14 / 8)
    # client 1 holds 60 examples, batch 8: T = 8, g(t) = 12 + 48 t / 6.4 = 12 + 7.5 t; passes
    # start at t = 0, 2, 6 with prefixes 12, 27, 57 (2, 4, 8 batches): 14 steps, 57/60 covered
    n = len(task.client_data(1)[0])
    assert n == 60
    size_at = DataCurriculum(sc.extras["curriculum"]).size_at(steps=8, batch_size=8, n=n)
    count = paced_step_count(steps=8, batch_size=8, size_at=size_at, finish_pass=True)
    assert count == 14
    paced = (14, 0.95)
    assert steps == {"curriculum": paced, "anti": paced, "random": paced, "plain": (14, 1.0)}


def test_expert_scoring_loads_the_checkpoint(tmp_path):
    sc = scenario()
    path = train_expert(sc, tmp_path / "expert.pt", epochs=1)
    params = scenario(curriculum={"scoring": "expert", "expert_path": str(path)}).extras[
        "curriculum"
    ]
    task = build_task(sc)
    expert = task.new_model()
    expert.load_state_dict(torch.load(path, weights_only=True))
    x, y = as_tensors(task.client_data(0)[0], torch.device("cpu"))
    got = DataCurriculum(params).scores(task.new_model(), x, y, state=None)
    assert torch.allclose(got, example_scores(expert, x, y))
    with pytest.raises(ConfigError, match="expert_path"):
        scenario(curriculum={"scoring": "expert"})


# -- the client scheduler -----------------------------------------------------------------
def test_scheduler_visits_the_paced_pool_in_rounds_then_rescores():
    sc = scenario(
        curriculum={"select": True, "client_pacing_a": 0.5, "client_pacing_b": 0.5},
        partition={"num_clients": 6},
        run={"rounds": 6, "clients_per_round": 2},
    )
    sched = ClientScheduler(sc.extras["curriculum"], rounds=6, per_round=2, seed=0)
    scores = {0: 0.5, 1: 0.1, 2: 0.3, 3: 0.9, 4: 0.2, 5: 0.7}
    calls = []

    def query(cids):
        calls.append(cids)
        return {c: {"score": scores[c]} for c in cids}

    rounds = [sched.next_round(r, list(range(6)), query) for r in range(1, 7)]
    # T_c = 12; cycle 1 at u = 0: g = 3 -> {1, 4, 2}; cycle 2 at u = 3: int(3 + 3 * 3/6) = 4
    # -> {1, 4, 2, 0}; cycle 3 at u = 7: int(3 + 3 * 7/6) = 6 -> everyone
    assert [c["pool"] for c in sched.cycles] == [[1, 4, 2], [1, 4, 2, 0], [1, 4, 2, 0, 5, 3]]
    assert sorted(rounds[0] + rounds[1]) == [1, 2, 4]
    assert sorted(rounds[2] + rounds[3]) == [0, 1, 2, 4]
    assert set(rounds[4] + rounds[5]) < {0, 1, 2, 3, 4, 5}  # two of cycle 3's three rounds
    assert [len(r) for r in rounds] == [2, 1, 2, 2, 2, 2]
    assert len(calls) == 3 and all(c == list(range(6)) for c in calls)


def test_scheduler_anti_ordering_takes_the_hardest_clients():
    sc = scenario(curriculum={"select": True, "client_ordering": "anti"})
    sched = ClientScheduler(sc.extras["curriculum"], rounds=4, per_round=1, seed=0)
    sched.new_cycle(1, {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3})
    assert sched.cycles[0]["order"] == [1, 2, 3, 0]
    assert sched.cycles[0]["pool"] == [1]


def test_curriculum_selection_runs_through_query_messages():
    sc = scenario(
        curriculum={"select": True, "client_pacing_b": 0.5},
        run={"rounds": 3, "clients_per_round": 2},
    )
    rows, driver, grid = run_inline(sc)
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    cycles = driver.strategy.scheduler.cycles
    assert len(queries) == 4 * len(cycles)
    for row in rows[1:]:
        assert set(row["clients"]) <= set(cycles[int(row["curriculum_cycle"]) - 1]["pool"])
    assert rows[1]["select_bytes_down"] > 0 and rows[1]["bytes_down"] > rows[1]["select_bytes_down"]
    assert driver.summary_extra()["curriculum"]["cycles"] == cycles


# -- privacy ------------------------------------------------------------------------------
DP = {"name": "dpsgd", "batch_size": 8, "lr": 0.1, "noise_multiplier": 1.0}


def test_dp_client_is_refused_without_the_opt_in():
    with pytest.raises(ConfigError, match="allow_private_scoring"):
        scenario(client=DP, curriculum={"ordering": "none", "select": True})
    with pytest.raises(ConfigError, match="curriculum.ordering"):
        scenario(client=DP, curriculum={"allow_private_scoring": True})


def test_the_opt_in_is_recorded_next_to_epsilon():
    sc = scenario(
        client=DP,
        curriculum={"ordering": "none", "select": True, "allow_private_scoring": True},
        run={"rounds": 1, "clients_per_round": 2},
    )
    rows, driver, _ = run_inline(sc)
    extra = driver.summary_extra()
    assert extra["curriculum_private_scoring"]["opt_in"] is True
    assert extra["curriculum_private_scoring"]["accounted"] is False
    assert "sample_level" in extra["privacy"]
    assert set(extra["clients_final"]["epsilon"]) == {str(c) for c in rows[1]["clients"]}


def test_wrapper_leaves_runs_without_the_section_alone():
    plain = build_strategy(scenario())
    assert type(plain).__name__ == "FedAvg"
    wrapped = build_strategy(scenario(curriculum={}))
    assert wrapped.select_clients(1, [0, 1], query=lambda c: {}) is None
    assert np.isfinite(wrapped.strategy.fraction_train)
