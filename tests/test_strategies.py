"""Strategies with mock replies (no Ray): Flower's aggregation through fedopt's selection."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inline import set_task_identity

from fedopt.config import parse_scenario
from fedopt.records import SelectedGrid
from fedopt.registry import STRATEGIES, load_builtins

load_builtins()


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def strategy(name, **params):
    requires = getattr(STRATEGIES.get(name).obj, "requires", {})  # its paired client, if any
    s = parse_scenario({**requires, "strategy": {"name": name, **params}})
    return STRATEGIES.get(name).obj(s.strategy.params, scenario=s)


def replies_for(messages, weights, values):
    """One reply per message: arrays filled with `value`, weighted by `n`."""
    out = []
    for msg, n, v in zip(messages, weights, values, strict=True):
        content = RecordDict(
            {
                "arrays": ArrayRecord([np.full((2, 3), v, dtype=np.float32)]),
                "metrics": MetricRecord({"num-examples": n, "train_loss": v}),
            }
        )
        out.append(Message(content, reply_to=msg))
    return out


def initial():
    return ArrayRecord([np.zeros((2, 3), dtype=np.float32)])


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_contract_every_strategy_trains_exactly_the_selected_nodes(name):
    strat = strategy(name)
    view = SelectedGrid(MockGrid([11, 22, 33, 44, 55]), [22, 44, 55])
    msgs = list(strat.configure_train(1, initial(), ConfigRecord(), view))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [22, 44, 55]
    assert all(m.content["config"]["server-round"] == 1 for m in msgs)
    arrays, metrics = strat.aggregate_train(1, replies_for(msgs, [10, 10, 10], [1.0, 2.0, 3.0]))
    assert arrays is not None and metrics is not None
    out = arrays.to_numpy_ndarrays()[0]
    assert out.shape == (2, 3) and np.isfinite(out).all()
    evals = list(strat.configure_evaluate(1, arrays, ConfigRecord(), view))
    assert sorted(m.metadata.dst_node_id for m in evals) == [22, 44, 55]


def run_one(name, weights, values, **params):
    strat = strategy(name, **params)
    view = SelectedGrid(MockGrid(range(len(weights))), list(range(len(weights))))
    msgs = sorted(
        strat.configure_train(1, initial(), ConfigRecord(), view),
        key=lambda m: m.metadata.dst_node_id,
    )
    arrays, metrics = strat.aggregate_train(1, replies_for(msgs, weights, values))
    return arrays.to_numpy_ndarrays()[0], metrics, msgs


def test_fedavg_is_the_example_weighted_mean():
    out, metrics, _ = run_one("fedavg", [10, 30], [1.0, 3.0])
    np.testing.assert_allclose(out, np.full((2, 3), 2.5), rtol=1e-7)
    assert metrics["train_loss"] == pytest.approx(2.5)


def test_fedprox_sends_mu_to_clients():
    _, _, msgs = run_one("fedprox", [1, 1], [0.0, 0.0], proximal_mu=0.25)
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in msgs)


def test_fedmedian_and_trimmed_mean():
    out, _, _ = run_one("fedmedian", [1, 1, 1], [1.0, 2.0, 10.0])
    np.testing.assert_allclose(out, 2.0)
    out, _, _ = run_one("fedtrimmedavg", [1] * 5, [0.0, 1.0, 2.0, 3.0, 100.0], beta=0.2)
    np.testing.assert_allclose(out, 2.0)


def test_krum_picks_a_client_model_not_the_outlier():
    out, _, _ = run_one("krum", [1] * 5, [1.0, 1.1, 0.9, 1.0, 50.0], num_malicious_nodes=1)
    assert out[0, 0] in np.float32([1.0, 1.1, 0.9])


def test_fedavgm_applies_momentum_on_the_pseudo_gradient():
    # first round: pseudo-gradient d = x0 - mean = -2; momentum buffer = d; x1 = x0 - lr * d
    out, _, _ = run_one(
        "fedavgm", [1, 1], [1.0, 3.0], server_learning_rate=0.5, server_momentum=0.9
    )
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_fedadam_first_step_matches_the_adam_formula():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    out, _, _ = run_one("fedadam", [1, 1], [1.0, 3.0], eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    delta = 2.0
    m = (1 - b1) * delta
    v = (1 - b2) * delta**2
    # Flower's bias-corrected step size uses the exponent server_round + 1 (= 2 in round 1)
    eta_t = eta * np.sqrt(1 - b2**2) / (1 - b1**2)
    np.testing.assert_allclose(out, eta_t * m / (np.sqrt(v) + tau), rtol=1e-5)


def test_wrapped_strategy_forwards_steps_attributes_and_summary():
    from fedopt.wrapper import WrappedStrategy

    inner = strategy("fedavgm", server_learning_rate=0.5, server_momentum=0.9)
    inner.summary_extra = lambda: {"inner": 1}
    outer = WrappedStrategy(WrappedStrategy(inner))
    view = SelectedGrid(MockGrid([1, 2]), [1, 2])
    msgs = sorted(
        outer.configure_train(1, initial(), ConfigRecord(), view),
        key=lambda m: m.metadata.dst_node_id,
    )
    arrays, _ = outer.aggregate_train(1, replies_for(msgs, [1, 1], [1.0, 3.0]))
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.0, rtol=1e-6)
    assert outer.server_momentum == 0.9 and outer.current_arrays is not None
    assert outer.summary_extra() == {"inner": 1}
