"""Graphs, mixing matrices, schedules and parameter mixing of decentralized training."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedopt import topology as tp
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.registry import load_builtins

load_builtins()

T = 1 / 3


def plan(m, **kw):
    return tp.GossipPlan(num_nodes=m, **kw)


@pytest.mark.parametrize("m", [2, 3, 8, 16])
@pytest.mark.parametrize("topology", sorted(tp.TOPOLOGIES))
@pytest.mark.parametrize("schedule", sorted(tp.SCHEDULES))
def test_every_mixing_matrix_is_row_stochastic(m, topology, schedule):
    mixings = ["uniform"] + ([] if tp.TOPOLOGIES[topology].directed else ["metropolis"])
    for mixing in mixings:
        p = plan(m, topology=topology, mixing=mixing, schedule=schedule, r=1.3, point=0.5)
        for t in (1, 5, 10):
            w = p.matrix(t, 10)
            assert w.shape == (m, m) and (w >= 0).all()
            np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
            assert (np.diag(w) > 0).all()
            if mixing == "metropolis":
                np.testing.assert_allclose(w, w.T)  # doubly stochastic: the mean is kept


def test_small_graphs_match_hand_made_matrices():
    ring4 = [[T, T, 0, T], [T, T, T, 0], [0, T, T, T], [T, 0, T, T]]
    np.testing.assert_allclose(plan(4, topology="ring").matrix(1, 1), ring4)
    np.testing.assert_allclose(plan(2, topology="ring").matrix(1, 1), [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(plan(3, topology="complete").matrix(1, 1), np.full((3, 3), T))
    # 2 x 3 torus: node 0 = cell (0, 0) hears (1, 0) = 3 (above and below), (0, 2) = 2, (0, 1) = 1
    assert tp.torus_shape(6) == (2, 3) and tp.torus_shape(16) == (4, 4)
    assert np.flatnonzero(tp.torus_graph(6)[0]).tolist() == [1, 2, 3]
    assert tp.torus_graph(16).sum(axis=1).tolist() == [4] * 16
    # exponential graph on 8 nodes: node k hears k+1, k+2, k+4
    w = plan(8, topology="exponential").matrix(1, 1)
    assert np.flatnonzero(w[0]).tolist() == [0, 1, 2, 4]
    assert np.flatnonzero(w[6]).tolist() == [0, 2, 6, 7]
    np.testing.assert_allclose(w[w > 0], 0.25)


def test_metropolis_weights_of_a_star():
    star = np.zeros((4, 4), dtype=bool)
    star[0, 1:] = star[1:, 0] = True  # centre degree 3, leaves degree 1
    w = tp.metropolis_weights(star)
    expected = np.array(
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]]
    )
    np.testing.assert_allclose(w, expected)
    np.testing.assert_allclose(tp.uniform_weights(star)[1], [0.5, 0.5, 0, 0])
    with pytest.raises(ValueError, match="undirected"):
        tp.metropolis_weights(tp.exponential_graph(8))


def test_random_r_peers_follow_the_paper():
    m, rounds = 16, 300
    p = plan(m, topology="random", r=0.2, seed=4)
    counts = np.array([p.adjacency(t, rounds).sum(axis=1) for t in range(1, rounds + 1)])
    assert set(np.unique(counts)) == {0, 1}
    assert abs(counts.mean() - 0.2) < 0.03  # 4800 draws of Bernoulli(0.2)
    two = plan(m, topology="random", r=2.5).adjacency(3, 10).sum(axis=1)
    assert set(two.tolist()) <= {2, 3}
    assert not plan(m, topology="random", r=0.0).adjacency(1, 1).any()
    assert plan(5, topology="random", r=9.0).adjacency(1, 1).sum() == 20  # capped: complete
    # seeded by (seed, round): replayable, different rounds differ
    assert np.array_equal(p.adjacency(7, rounds), plan(m, r=0.2, seed=4).adjacency(7, rounds))
    assert not np.array_equal(p.adjacency(7, rounds), p.adjacency(8, rounds))


def test_erdos_renyi_is_undirected_and_drawn_once():
    p = plan(12, topology="erdos_renyi", edge_probability=0.4, seed=1)
    a = p.adjacency(1, 10)
    assert np.array_equal(a, a.T) and not np.diag(a).any()
    assert np.array_equal(a, p.adjacency(9, 10))
    full = plan(5, topology="erdos_renyi", edge_probability=1.0).adjacency(1, 1)
    assert np.array_equal(full, tp.complete_graph(5))


def test_schedules_pick_no_sparse_or_dense_phases():
    rounds = 10
    phases = {
        name: [plan(4, schedule=name, point=0.7, window=0.2).phase(t, rounds) for t in range(1, 11)]
        for name in tp.SCHEDULES
    }
    assert phases["none"] == ["none"] * 10
    assert phases["fixed"] == ["sparse"] * 10
    assert phases["truncate"] == ["sparse"] * 6 + ["dense"] * 4
    assert phases["windowed"] == ["sparse"] * 6 + ["dense"] * 2 + ["sparse"] * 2
    np.testing.assert_array_equal(plan(4, schedule="none").matrix(3, 10), np.eye(4))
    dense = plan(4, topology="ring", schedule="truncate", point=0.5).matrix(9, 10)
    np.testing.assert_allclose(dense, 0.25)


def test_gossip_with_the_complete_graph_equals_averaging():
    rng = np.random.default_rng(0)
    states = [
        {"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(k, dtype=np.int64)}
        for k in range(5)
    ]
    w = plan(5, topology="complete").matrix(1, 1)
    mixed = [
        tp.mix([states[k], *(states[j] for j in range(5) if j != k)], [0.2] * 5) for k in range(5)
    ]
    assert w[0, 0] == 0.2
    contents = [
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(s["w"])}),
                "metrics": MetricRecord({"merge-weight": 1.0}),
            }
        )
        for s in states
    ]
    flower_mean = aggregate_arrayrecords(contents, "merge-weight")["w"].numpy()
    for k, out in enumerate(mixed):
        assert out["w"].dtype == np.float32
        np.testing.assert_allclose(out["w"], flower_mean, rtol=1e-6, atol=1e-7)
        assert out["n"] == k  # counters are the node's own, never averaged
    np.testing.assert_allclose(tp.consensus_distance(mixed), 0.0, atol=1e-10)


def test_consensus_distance_by_hand():
    a = {"w": np.array([0.0, 0.0]), "c": np.array([1])}
    b = {"w": np.array([2.0, 4.0]), "c": np.array([9])}
    # mean (1, 2); ||a - mean||^2 = 5, ||b - mean||^2 = 5
    assert tp.consensus_distance([a, b]) == pytest.approx(5.0)


def test_params_stay_in_step_with_the_topology_table_and_reject_bad_mixing():
    from strategies.decentralized import DecentralizedParams

    hints = typing.get_type_hints(DecentralizedParams)
    assert set(typing.get_args(hints["topology"])) == set(tp.TOPOLOGIES)
    assert set(typing.get_args(hints["schedule"])) == set(tp.SCHEDULES)
    assert set(typing.get_args(hints["mixing"])) == set(tp.MIXINGS)
    raw = {
        "strategy": {"name": "decentralized", "topology": "random", "mixing": "metropolis"},
        "client": {"name": "decentralized"},
    }
    with pytest.raises(ConfigError) as err:
        parse_scenario(raw)
    assert err.value.key == "strategy.mixing"
    with pytest.raises(ConfigError) as err:
        parse_scenario({**raw, "strategy": {"name": "decentralized", "topology": "star"}})
    assert err.value.key == "strategy.topology"
