"""The DP-SGD client: Opacus clipping and noise, accounting across rounds, budgets, models."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from inline import run_inline, set_task_identity
from opacus.accountants import RDPAccountant
from torch import nn

from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.privacy.plan import Ledger
from fedopt.registry import load_builtins
from fedopt.task import build_task

load_builtins()

DATA = {"name": "blobs", "num_examples": 400, "num_features": 8}


def bn_model(input_shape, num_classes):
    """A model with BatchNorm, which Opacus cannot train."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[0], 16), nn.BatchNorm1d(16), nn.Linear(16, num_classes)
    )


def raw(**client):
    return {
        "name": "dp",
        "data": DATA,
        "partition": {"num_clients": 4, "test_fraction": 0.25},
        "model": {"name": "mlp", "hidden": [16]},
        "client": {"name": "dpsgd", "batch_size": 16, "lr": 0.1, "noise": "replayable", **client},
        "run": {"rounds": 5, "seed": 3},
    }


def setup(r):
    set_task_identity()
    task = build_task(parse_scenario(r))
    return task, make_client_app(lambda ctx: {"": r})


def context():
    return Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def train(app, task, ctx, cid=0, server_round=1, arrays=None):
    arrays = arrays or ArrayRecord(task.new_model().state_dict())
    cfg = ConfigRecord({"cid": cid, "server-round": server_round})
    msg = Message(
        RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=5, message_type=MessageType.TRAIN
    )
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply.content


def flat(content):
    return np.concatenate([a.ravel() for a in content["arrays"].to_numpy_ndarrays()])


def test_epsilon_composes_across_the_rounds_a_client_joins():
    task, app = setup(raw(noise_multiplier=1.1))
    ctx = context()
    n = len(task.client_data(0)[0])
    tau = int(np.ceil(n / 16))
    for r in (1, 3, 4):
        m = train(app, task, ctx, server_round=r)["metrics"]
        assert m["dp_steps"] == tau and m["dp_q"] == 1 / tau and m["dp_sigma"] == 1.1
    acc = RDPAccountant()
    acc.history = [(1.1, 1 / tau, 3 * tau)]  # one accountant run for 3τ steps
    assert m["dp_steps_total"] == 3 * tau
    assert m["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    ledger = Ledger(ctx.state["/client0/" + Ledger.NAME])
    assert ledger.rounds == [1, 3, 4] and ledger.steps == [tau] * 3


def test_same_message_same_update_other_round_other_noise():
    task, app = setup(raw(noise_multiplier=1.0))
    a = flat(train(app, task, context(), server_round=2))
    b = flat(train(app, task, context(), server_round=2))
    c = flat(train(app, task, context(), server_round=3))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def big_data(n=12):
    """Few, large-norm examples: every per-sample gradient is far above C."""
    return {"name": "blobs", "num_examples": 4 * n * 2, "num_features": 8, "class_sep": 50.0}


def test_per_sample_clipping_bounds_the_update():
    r = raw(non_private=True, batch_size=64, steps=1, lr=1.0, max_grad_norm=0.5)
    r["data"] = big_data()
    r["model"] = {"name": "logreg"}
    task, app = setup(r)
    start = flat({"arrays": ArrayRecord(task.new_model().state_dict())})
    out = train(app, task, context())
    assert out["metrics"]["dp_q"] == 1.0 and "epsilon" not in out["metrics"]
    # q = 1: the batch is the whole client, and the mean of clipped gradients has norm <= C
    assert np.linalg.norm(flat(out) - start) <= 1.0 * 0.5 + 1e-6
    r["client"] = {"name": "sgd", "batch_size": 64, "steps": 1, "lr": 1.0}
    task, app = setup(r)
    assert np.linalg.norm(flat(train(app, task, context())) - start) > 5 * 0.5


def test_noise_has_the_expected_spread():
    sigma, c = 2.0, 1.0
    r = raw(noise_multiplier=sigma, max_grad_norm=c, batch_size=64, steps=1, lr=1.0)
    r["model"] = {"name": "mlp", "hidden": [32]}
    task, app = setup(r)
    n = len(task.client_data(0)[0])
    diff = flat(train(app, task, context(), server_round=1)) - flat(
        train(app, task, context(), server_round=2)
    )
    # same data and model (q = 1: identical clipped sums), independent noise N(0, σ²C²)/n each
    assert diff.std() == pytest.approx(np.sqrt(2) * sigma * c / n, rel=0.1)


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


def test_hooks_do_not_accumulate_and_batch_memory_manager_matches():
    task, app = setup(raw(noise_multiplier=1.0))
    base = [train(app, task, context(), cid=c) for c in range(4)]
    from fedopt.clientapp import _RESIDENT

    model = _RESIDENT.runtime.model
    assert hook_count(model) == 0
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    task, app = setup(raw(noise_multiplier=1.0, max_physical_batch_size=3))
    split = train(app, task, context(), cid=2)
    assert split["metrics"]["dp_steps"] == base[2]["metrics"]["dp_steps"]
    assert np.allclose(flat(split), flat(base[2]), atol=1e-5)


def test_budget_stops_a_client_and_says_so():
    task, app = setup(raw(target_epsilon=2.0, max_participations=2))
    ctx = context()
    first = train(app, task, ctx, server_round=1)["metrics"]
    second = train(app, task, ctx, server_round=2)["metrics"]
    assert first["dp_exhausted"] == 0 and second["dp_exhausted"] == 0
    assert first["epsilon"] < second["epsilon"] <= 2.0
    sent = ArrayRecord(task.new_model().state_dict())
    third = train(app, task, ctx, server_round=3, arrays=sent)
    m = third["metrics"]
    assert m["dp_exhausted"] == 1 and m["dp_steps"] == 0 and m["epsilon"] == second["epsilon"]
    assert np.array_equal(flat(third), flat({"arrays": sent}))


def test_bad_settings_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="client.noise_multiplier.*non_private = true"):
        parse_scenario(raw(noise_multiplier=0.0))
    with pytest.raises(ConfigError, match="client.target_epsilon"):
        parse_scenario(raw(target_epsilon=-1.0))
    assert parse_scenario(raw()).client.params.target_epsilon == 8.0  # private by default
    with pytest.raises(ConfigError, match="client.accountant.*gdp, pld, prv, rdp"):
        parse_scenario(raw(noise_multiplier=1.0, accountant="moments"))
    with pytest.raises(ConfigError, match="client.max_grad_norm"):
        parse_scenario(raw(noise_multiplier=1.0, max_grad_norm=None))


def test_batchnorm_is_named_and_fix_model_applies_opacus_fix():
    r = raw(noise_multiplier=1.0)
    r["model"] = {"name": "test_dpsgd:bn_model"}
    with pytest.raises(ConfigError, match="client.fix_model.*BatchNorm"):
        build_task(parse_scenario(r))
    r["client"]["fix_model"] = True
    task, app = setup(r)
    model = task.new_model()
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert train(app, task, context())["metrics"]["dp_steps"] > 0


def test_inline_run_reports_recomputable_epsilon_per_client_and_round():
    r = raw(noise_multiplier=1.2, target_epsilon=30.0)
    r["run"] = {"rounds": 3, "clients_per_round": 2, "fed_eval_every": 0, "seed": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, driver, _ = run_inline(parse_scenario(r))
    steps: dict[str, int] = {}
    for row in rows[1:]:
        for cid, pc in row["per_client"].items():
            steps[cid] = steps.get(cid, 0) + int(pc["dp_steps"])
            acc = RDPAccountant()
            acc.history = [(pc["dp_sigma"], pc["dp_q"], steps[cid])]
            assert pc["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
        assert row["epsilon_max"] <= 30.0
    extra = driver.summary_extra()
    finals = extra["clients_final"]["epsilon"]
    assert rows[-1]["epsilon_max"] == max(finals.values())
    sample = extra["privacy"]["sample_level"]
    assert sample["accountant"] == "rdp" and sample["delta"] == 1e-5
    assert sample["plan"]["participations"] == 3
    for cid, h in sample["clients"].items():
        acc = RDPAccountant()
        acc.history = list(zip(h["sigma"], h["q"], h["steps"], strict=True))
        assert finals[cid] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert torch.get_num_threads() >= 1


def test_expected_participations_calibrate_sigma_for_rounds_times_m_over_n(monkeypatch):
    from fedopt.privacy import preflight
    from fedopt.privacy.calibration import calibrate_noise
    from fedopt.privacy.plan import (
        expected_participations,
        planned_participations,
        resolve_participations,
        sigma_request,
    )

    assert expected_participations(rounds=20, clients_per_round=3, num_clients=6) == 10
    assert expected_participations(rounds=7, clients_per_round=2, num_clients=5) == 3  # ceil 2.8
    assert expected_participations(rounds=5, clients_per_round=4, num_clients=4) == 5
    r = raw(target_epsilon=2.0, max_participations="expected")
    r["run"] = {"rounds": 7, "clients_per_round": 2, "seed": 3}  # 4 clients: ceil(7·2/4) = 4
    s = parse_scenario(r)
    p = s.client.params
    assert p.max_participations == "expected"
    assert resolve_participations(p, s).max_participations == 4
    counts = {"clients_per_round": 2, "num_clients": 4}
    req = sigma_request(p, sample_rate=0.1, local_steps=5, rounds=7, **counts)
    assert req["steps"] == 4 * 5
    assert req == sigma_request(
        resolve_participations(p, s), sample_rate=0.1, local_steps=5, rounds=7
    )
    worst = sigma_request(
        parse_scenario(raw(target_epsilon=2.0)).client.params,
        sample_rate=0.1,
        local_steps=5,
        rounds=7,
    )
    assert worst["steps"] == 7 * 5
    sigma, sigma_worst = calibrate_noise(**req), calibrate_noise(**worst)
    assert sigma < sigma_worst  # less noise for the same nominal ε: the paper's calibration

    def eps(steps):
        acc = RDPAccountant()
        acc.history = [(sigma, 0.1, steps)]
        return acc.get_epsilon(delta=1e-5)

    # The 4 expected participations spend the budget; a 5th would pass it, so it is refused.
    assert 2.0 - 0.01 <= eps(20) <= 2.0 < eps(25)
    with pytest.raises(ConfigError, match="client.max_participations.*clients_per_round"):
        planned_participations(p, 7)
    with pytest.raises(ConfigError, match="client.max_participations.*'expected'"):
        parse_scenario(raw(target_epsilon=2.0, max_participations="mean"))
    asked = []
    monkeypatch.setattr(preflight, "check_reachable", lambda **kw: asked.append(kw))
    task = build_task(s)
    preflight.check_sample_level(task)
    assert asked and all(kw["steps"] % 4 == 0 and "4 rounds x" in kw["where"] for kw in asked)
    q, tau = local_plan_of(task, p)
    assert {kw["steps"] for kw in asked} == {4 * tau}
    assert asked[0]["sample_rate"] == q


def local_plan_of(task, p):
    from fedopt.privacy.plan import local_plan
    from fedopt.privacy.preflight import train_sizes

    plans = {local_plan(p, n) for n in train_sizes(task)}
    assert len(plans) == 1  # blobs split evenly: one plan for every client
    return plans.pop()


def test_a_learning_rate_schedule_is_refused_for_dp_sgd_clients():
    from fedopt.config import load_scenario
    from fedopt.errors import ConfigError

    sets = ["client.name=dpsgd", "client.target_epsilon=3", "client.lr_schedule=inverse_power"]
    with pytest.raises(ConfigError, match="client.lr_schedule = 'inverse_power' is not allowed"):
        load_scenario(Path(__file__).resolve().parents[1] / "scenarios/quickstart.toml", sets)
