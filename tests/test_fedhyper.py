"""FedHyper: the strategy on mock replies, the per-step client rule, and whole inline runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inline import run_inline, set_task_identity
from torch import nn

from fedopt import hypergrad as hg
from fedopt.client import ClientJob, ClientState
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.plots import plot_run
from fedopt.records import SelectedGrid
from fedopt.registry import CLIENTS, STRATEGIES, load_builtins
from strategies.fedhyper import FedHyper, FedHyperParams
from strategies.flower import flower_kwargs

load_builtins()


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def rec(arrays):
    """An ArrayRecord of numpy arrays by name."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def make(variant, *, lr0=0.01, **params):
    p = FedHyperParams(variant=variant, **params)
    return FedHyper(**flower_kwargs(), variant=p.resolved(), params=p, lr0=lr0)


def round_of(strat, server_round, theta, client_values, weights=None):
    """One configure/aggregate cycle; client i replies with the model ``client_values[i]``."""
    view = SelectedGrid(MockGrid(range(len(client_values))), list(range(len(client_values))))
    arrays = rec({"w": np.asarray(theta, dtype=np.float32)})
    msgs = list(strat.configure_train(server_round, arrays, ConfigRecord(), view))
    weights = weights or [1] * len(client_values)
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": rec({"w": np.asarray(v, dtype=np.float32)}),
                    "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
                }
            ),
            reply_to=m,
        )
        for m, v, n in zip(msgs, client_values, weights, strict=True)
    ]
    out, metrics = strat.aggregate_train(server_round, replies)
    return out["w"].numpy(), metrics, msgs


def test_g_rounds_with_mock_replies_follow_the_rule():
    strat = make("G")
    theta = np.zeros(6)
    # round 1: mean 2 -> delta 2, no previous update: rate 1
    theta, m, _ = round_of(strat, 1, theta, [np.full(6, 1.0), np.full(6, 3.0)])
    np.testing.assert_allclose(theta, 2.0)
    assert m["lr_global"] == 1.0 and m["train_loss"] == 0.5
    # round 2: delta 0.5, <2, 0.5> * 6 = 6 -> a clipped to 4: theta = 2 + 5 * 0.5
    theta, m, _ = round_of(strat, 2, theta, [np.full(6, 2.5), np.full(6, 2.5)])
    np.testing.assert_allclose(theta, 4.5)
    assert m["lr_global"] == 5.0
    # round 3: delta -0.5 opposes: a = 4 - 1.5 = 2.5, theta = 4.5 + 3.5 * (-0.5)
    theta, m, _ = round_of(strat, 3, theta, [np.full(6, 3.5), np.full(6, 4.5)], weights=[1, 1])
    np.testing.assert_allclose(theta, 2.75)
    assert m["lr_global"] == 3.5
    assert strat.summary_extra() == {"fedhyper": {"lr_global_final": 3.5}}


def released_loop(variant, client_moves, theta0):
    """FedHyper-G/GM transcribed from the released ``src/federated_main.py`` (torch vectors)."""
    theta = torch.tensor(theta0, dtype=torch.float64)
    agg, last, rates = 0.0, None, []
    for epoch, moves in enumerate(client_moves):
        origin = theta.clone()
        new = torch.stack([origin + torch.tensor(mv) for mv in moves]).mean(0)
        grad = new - origin
        if variant == "G":
            if epoch > 0:
                agg = min(4.0, max(-0.8, agg + float((last * grad).sum())))
                new = agg * grad + new
            last = grad
        else:
            if epoch == 0:
                last = grad
            else:
                agg = min(4.0, max(-0.2, agg + float((last * grad).sum())))
                new = agg * grad + 0.9 * agg * last + new
                last = grad + 0.9 * last
        rates.append(1 + agg)
        theta = new
    return theta.numpy(), rates


@pytest.mark.parametrize("variant", ["G", "GM"])
def test_strategy_matches_the_released_loop(variant):
    rng = np.random.default_rng(7)
    moves = [rng.normal(0.1, 0.3, size=(3, 5)) for _ in range(6)]
    theta0 = rng.normal(size=5)
    want, want_rates = released_loop(variant, moves, theta0)
    strat = make(variant)
    theta, rates = theta0.astype(np.float32), []
    for r, mv in enumerate(moves, start=1):
        # clients move from the float32 global model the strategy handed them
        theta, m, _ = round_of(strat, r, theta, [theta.astype(np.float64) + d for d in mv])
        rates.append(m["lr_global"])
    np.testing.assert_allclose(rates, want_rates, rtol=1e-5)
    assert max(want_rates) > 1.0  # the sequence does move the rate
    np.testing.assert_allclose(theta, want, rtol=1e-4, atol=1e-5)


def test_sl_sends_its_rate_and_keeps_it_across_rounds():
    strat = make("SL", lr0=0.01)
    _, m1, msgs = round_of(strat, 1, np.zeros(4), [np.full(4, 1.0)])
    assert msgs[0].content["config"]["local-lr"] == 0.01 and m1["lr_local"] == 0.01
    # delta 1 then 1: a = 4, local rate 0.01 * 5; the model is plain FedAvg (rate 1)
    out, m2, msgs = round_of(strat, 2, np.full(4, 1.0), [np.full(4, 2.0)])
    np.testing.assert_allclose(out, 2.0)
    assert msgs[0].content["config"]["local-lr"] == 0.01 and m2["lr_global"] == 1.0
    # round 3 uses the rate round 2 computed (the released code resets it to lr0 here)
    _, m3, msgs = round_of(strat, 3, np.full(4, 2.0), [np.full(4, 2.5)])
    assert msgs[0].content["config"]["local-lr"] == pytest.approx(0.05)
    assert m3["lr_local"] == pytest.approx(0.05)
    # a = 4 + 0.5 * 4 = 6: 0.07, then a huge step is clipped at local_lr_max
    _, _, msgs = round_of(strat, 4, np.full(4, 2.5), [np.full(4, 12.5)])
    assert msgs[0].content["config"]["local-lr"] == pytest.approx(0.07)
    _, _, msgs = round_of(strat, 5, np.full(4, 12.5), [np.full(4, 13.0)])
    assert msgs[0].content["config"]["local-lr"] == 0.1


def test_cl_sends_the_previous_global_update_and_the_rule_constants():
    strat = make("FULL", client_gamma_max=1.05)
    _, _, msgs = round_of(strat, 1, np.zeros(3), [np.full(3, 1.0), np.full(3, 2.0)])
    assert hg.PREV_UPDATE_KEY not in msgs[0].content  # no previous update yet
    cfg = msgs[0].content["config"]
    assert cfg[hg.CLIENTS_KEY] == 2 and cfg[hg.GAMMA_MAX_KEY] == 1.05
    assert (cfg[hg.LOW_KEY], cfg[hg.HIGH_KEY], cfg[hg.X_SCALE_KEY]) == (0.1, 10.0, 0.1)
    _, _, msgs = round_of(strat, 2, np.full(3, 1.5), [np.full(3, 2.0)])
    for msg in msgs:
        prev = msg.content[hg.PREV_UPDATE_KEY]["w"].numpy()
        np.testing.assert_allclose(prev, 1.5)  # the raw delta of round 1, not the momentum
        assert prev.dtype == np.float32


def bn_mlp(input_shape, num_classes):
    """A model with buffers (BatchNorm running statistics)."""
    n = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes)
    )


def test_buffers_are_averaged_not_extrapolated():
    s = parse_scenario(
        {
            "model": {"name": "test_fedhyper:bn_mlp"},
            "strategy": {"name": "fedhyper", "variant": "G"},
        }
    )
    strat = STRATEGIES.get("fedhyper").obj(s.strategy.params, scenario=s)
    assert strat.param_keys == {"1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    keys = ["2.weight", "2.running_var"]
    view = SelectedGrid(MockGrid([1]), [1])
    for r, (w, var) in enumerate([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)], start=1):
        arrays = rec(
            {k: np.full(2, v - 1, np.float32) for k, v in zip(keys, (w, var), strict=True)}
        )
        msgs = list(strat.configure_train(r, arrays, ConfigRecord(), view))
        reply = RecordDict(
            {
                "arrays": rec(
                    {k: np.full(2, v, np.float32) for k, v in zip(keys, (w, var), strict=True)}
                ),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        out, m = strat.aggregate_train(r, [Message(reply, reply_to=msgs[0])])
    # round 3: <1, 1> * 2 = 2 more, a = 4: the weight moves 5x, the buffer keeps the mean
    assert m["lr_global"] == 5.0
    np.testing.assert_allclose(out["2.weight"].numpy(), 2.0 + 5.0)
    np.testing.assert_allclose(out["2.running_var"].numpy(), 3.0)


def test_check_scenario_names_the_client_cl_needs():
    with pytest.raises(ConfigError, match="'fedhyper'") as err:
        parse_scenario({"strategy": {"name": "fedhyper", "variant": "CL"}})
    assert err.value.key == "client.name"
    s = parse_scenario(
        {"strategy": {"name": "fedhyper", "variant": "FULL"}, "client": {"name": "fedhyper"}}
    )
    assert s.strategy.params.resolved().client_local
    with pytest.raises(ConfigError, match="sgd") as err:
        parse_scenario(
            {
                "strategy": {"name": "fedhyper", "variant": "CL"},
                "client": {"name": "fedhyper", "optimizer": "adam"},
            }
        )
    assert err.value.key == "client.optimizer"
    # G, GM and SL drive any client, Adam included
    parse_scenario(
        {"strategy": {"name": "fedhyper", "variant": "SL"}, "client": {"optimizer": "adam"}}
    )


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"variant": "H"}, "strategy.variant"),
        ({"variant": "G", "momentum": 0.5}, "strategy.momentum"),
        ({"global_lr_min": 1.5}, "strategy.global_lr_min"),
        ({"global_lr_max": 0.5}, "strategy.global_lr_max"),
        ({"local_lr_min": 0.2}, "strategy.local_lr_max"),
        ({"client_factor_min": 2.0}, "strategy.client_factor_min"),
        ({"hyper_lr": 0.0}, "strategy.hyper_lr"),
    ],
)
def test_bad_parameters_name_their_key(params, key):
    with pytest.raises(ConfigError) as err:
        parse_scenario({"strategy": {"name": "fedhyper", **params}})
    assert err.value.key == key


def test_bounds_and_momentum_overrides():
    v = FedHyperParams(variant="GM", global_lr_max=3.0, momentum=0.5).resolved()
    assert v.global_bounds == (0.8, 3.0) and v.momentum == 0.5
    v = FedHyperParams(variant="SL", global_lr_min=0.5).resolved()
    assert v.global_bounds == (0.5, np.inf)


def client_job(model, x, y, *, lr, config, content, seed=0, **train):
    s = parse_scenario(
        {
            "client": {"name": "fedhyper", "lr": lr, "batch_size": 4, **train},
            "strategy": {"name": "fedhyper", "variant": "CL"},
        }
    )
    algo = CLIENTS.get("fedhyper").obj(s.client.params, scenario=s)
    job = ClientJob(
        cid=0,
        server_round=2,
        model=model,
        x=x,
        y=y,
        config=config,
        content=content,
        state=ClientState(RecordDict(), 0),
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
    )
    return algo.fit(job)


def tiny_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    return nn.Linear(3, 2), x, y


def test_cl_per_step_rate_on_a_tiny_problem():
    model, x, y = tiny_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    delta = {"weight": torch.full((2, 3), 0.05), "bias": torch.tensor([0.02, -0.02])}
    config = {hg.CLIENTS_KEY: 4, "server-round": 2}
    content = RecordDict({hg.PREV_UPDATE_KEY: ArrayRecord(delta)})
    lr, steps = 0.5, 6
    upd = client_job(model, x, y, lr=lr, config=config, content=content, steps=steps)

    # the rule written out by hand on a fresh copy of the model, on the same minibatches
    ref = nn.Linear(3, 2)
    ref.load_state_dict(start)
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(12, generator=gen) for _ in range(2)]
    batches = [p[i : i + 4] for p in perms for i in (0, 4, 8)]
    d = torch.cat([delta["weight"].reshape(-1), delta["bias"]])
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    beta, prev, rates = 1.0, d, []
    for k, idx in enumerate(batches, start=1):
        for group in opt.param_groups:
            group["lr"] = lr * beta
        rates.append(lr * beta)
        before = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
        if k >= 2:
            g = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]) - before
            gamma = min(1.1, 1 + 0.1 * float(g @ d) / 4 + float(g @ prev))
            beta = min(10.0, max(0.1, gamma * beta))
            prev = g
    assert upd.metrics["steps"] == steps == len(rates)
    assert rates[0] == rates[1] == lr  # steps 1 and 2 run at the initial rate
    assert len(set(rates[2:])) == 4  # then every step has its own rate
    assert upd.metrics["lr_client"] == pytest.approx(rates[-1], rel=1e-6)
    assert upd.metrics["lr_client_avg"] == pytest.approx(np.mean(rates), rel=1e-6)
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(upd.arrays[k].numpy(), v.numpy(), rtol=1e-6, atol=1e-7)


def test_cl_with_a_fixed_factor_is_plain_sgd_bitwise():
    model, x, y = tiny_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = {hg.LOW_KEY: 1.0, hg.HIGH_KEY: 1.0, hg.CLIENTS_KEY: 2}
    upd = client_job(model, x, y, lr=0.3, config=config, content=RecordDict(), epochs=2)
    s = parse_scenario({"client": {"name": "sgd", "lr": 0.3, "batch_size": 4, "epochs": 2}})
    sgd = CLIENTS.get("sgd").obj(s.client.params, scenario=s)
    model2 = nn.Linear(3, 2)
    model2.load_state_dict(start)
    job = ClientJob(0, 2, model2, x, y, {}, RecordDict(), ClientState(RecordDict(), 0),
                    torch.Generator().manual_seed(0), torch.device("cpu"))  # fmt: skip
    ref = sgd.fit(job)
    for k in start:
        assert torch.equal(
            torch.as_tensor(upd.arrays[k].numpy()), torch.as_tensor(ref.arrays[k].numpy())
        )
    assert upd.metrics["train_loss"] == ref.metrics["train_loss"]
    assert upd.metrics["lr_client"] == upd.metrics["lr_client_avg"] == 0.3


def test_cl_rate_follows_the_alignment_with_the_previous_update():
    model, x, y = tiny_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # the descent direction of the first batch, and its opposite, as the previous global update
    probe = nn.Linear(3, 2)
    probe.load_state_dict(start)
    F.cross_entropy(probe(x), y).backward()
    down = {n: -10 * p.grad for n, p in probe.named_parameters()}
    rates = {}
    for name, sign in (("aligned", 1.0), ("opposed", -1.0)):
        model.load_state_dict(start)
        content = RecordDict(
            {hg.PREV_UPDATE_KEY: ArrayRecord({k: sign * v for k, v in down.items()})}
        )
        upd = client_job(model, x, y, lr=0.2, config={hg.CLIENTS_KEY: 1}, content=content, steps=3)
        rates[name] = upd.metrics["lr_client"]
    assert rates["aligned"] > 0.2 > rates["opposed"]


def test_full_inline_run_reports_rates_and_replays_bitwise(tmp_path):
    raw = {
        "name": "fedhyper",
        "data": {"name": "blobs", "num_examples": 300, "num_features": 6},
        "partition": {"num_clients": 4},
        "model": {"name": "logreg"},
        "client": {"name": "fedhyper", "lr": 0.5, "batch_size": 16},
        "strategy": {"name": "fedhyper", "variant": "FULL"},
        "run": {"rounds": 3, "clients_per_round": 3, "fed_eval_every": 0},
    }
    rows, driver, grid = run_inline(parse_scenario(raw))
    again, _, _ = run_inline(parse_scenario(raw))
    assert [r["lr_global"] for r in rows[1:]] == [r["lr_global"] for r in again[1:]]
    assert [r["central_loss"] for r in rows] == [r["central_loss"] for r in again]
    assert rows[1]["lr_global"] == 1.0 and rows[3]["lr_global"] != 1.0
    for row in rows[1:]:
        assert row["lr_client_min"] <= row["lr_client_median"] <= row["lr_client_max"]
        assert 0.05 <= row["lr_client_min"] and row["lr_client_max"] <= 5.0
    # round 1 sends no previous update; later rounds do, to each of the 3 clients
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert [hg.PREV_UPDATE_KEY in m.content for m in train] == [False] * 3 + [True] * 6
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]
    assert driver.summary_extra()["fedhyper"]["lr_global_final"] == rows[3]["lr_global"]
    names = {p.name for p in plot_run(rows, tmp_path, title="fedhyper")}
    assert {"lr_global_vs_round.png", "lr_local_vs_round.png"} <= names
