"""The event schedule on the virtual clock: orders, versions, budgets, planned work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedopt.events import (
    ArrivalSchedule,
    BufferSchedule,
    FixedPeriodSchedule,
    SyncSchedule,
    Timeline,
    VersionStore,
    planned_work,
    simulate,
)
from fedopt.training import LocalTrainConfig, train_local

HAND = [1.0, 0.5, 0.3]  # per-update durations of clients 0, 1, 2


def events(schedule, durations, budget):
    """(time, [(cid, start version), ...]) per aggregation."""
    return [
        (agg.time, [(d.cid, d.version) for d in done])
        for agg, done in simulate(schedule, durations, time_budget=budget)
    ]


def test_async_order_on_a_hand_made_speed_list():
    got = events(ArrivalSchedule(), HAND, 1.1)
    want = [
        (0.3, [(2, 0)]),  # client 2 first, from the initial model
        (0.5, [(1, 0)]),
        (0.6, [(2, 1)]),  # client 2 again, from version 1 it got at t = 0.3
        (0.9, [(2, 3)]),
        (1.0, [(0, 0)]),  # tie at t = 1.0: the lower id first (numpy.argmin)
        (1.0, [(1, 2)]),
    ]
    assert [c for _, c in got] == [c for _, c in want]
    np.testing.assert_allclose([t for t, _ in got], [t for t, _ in want])


def test_fedfix_order_and_spans_on_a_hand_made_speed_list():
    got = simulate(FixedPeriodSchedule(0.5), HAND, time_budget=2.0)
    assert [a.time for a, _ in got] == [0.5, 1.0, 1.5, 2.0]
    parts = [[(d.cid, d.version) for d in done] for _, done in got]
    assert parts[0] == [(1, 0), (2, 0)]
    assert parts[1] == [(0, 0), (1, 1), (2, 1)]
    # span = new version - start version = ceil(tau_i / delta_t)
    for agg, done in got:
        for d in done:
            assert agg.index - d.version == math.ceil(HAND[d.cid] / 0.5 - 1e-12)


def test_sync_and_buffer_orders():
    sync = simulate(SyncSchedule(), HAND, time_budget=3.0)
    assert [a.time for a, _ in sync] == [1.0, 2.0, 3.0]
    assert all(sorted(d.cid for d in done) == [0, 1, 2] for _, done in sync)
    assert all(d.version == a.index - 1 for a, done in sync for d in done)
    buf = events(BufferSchedule(2), HAND, 1.0)
    # at t = 1.0 clients 0 and 1 tie for the second slot: the lower id takes it
    assert [c for _, c in buf] == [[(1, 0), (2, 0)], [(0, 0), (2, 1)]]
    np.testing.assert_allclose([t for t, _ in buf], [0.5, 1.0])


def reference_schedule(scheme, tau, budget):
    """The FedFix code's ``clients_time_schedule`` (Accenture asynchronous_FL branch), transcribed.

    Returns the matrix of start versions (-1: the client does not take part). One
    deliberate difference: FedBuff's loop there stops on ``min(return) > T`` and can
    aggregate after T; here no aggregation happens after the budget.
    """
    M = len(tau)
    ret = np.array(tau, dtype=float)
    latest = np.zeros(M, dtype=int)
    rows = []
    if scheme[0] == "fedfix":
        dt = scheme[1]
        for n in range(int(budget / dt)):
            idx = np.where(ret <= (n + 1) * dt)[0]
            ret[idx] = (n + 1) * dt + np.array(tau)[idx]
            v = -np.ones(M, dtype=int)
            v[idx] = latest[idx]
            latest[idx] = n + 1
            rows.append(v)
        return np.array(rows)
    c = 1 if scheme[0] == "async" else scheme[1]
    n = 0
    while np.min(ret) <= budget:
        idx = np.argsort(ret, kind="stable")[:c]
        t = np.max(ret[idx])
        if t > budget:
            break
        v = -np.ones(M, dtype=int)
        v[idx] = latest[idx]
        ret[idx] = t + np.array(tau)[idx]
        n += 1
        latest[idx] = n
        rows.append(v)
    return np.array(rows)


def as_matrix(result, m):
    out = -np.ones((len(result), m), dtype=int)
    for i, (_, done) in enumerate(result):
        for d in done:
            out[i, d.cid] = d.version
    return out


@pytest.mark.parametrize(
    ("scheme", "schedule"),
    [
        (("fedfix", 0.25), FixedPeriodSchedule(0.25)),
        (("fedfix", 0.6), FixedPeriodSchedule(0.6)),
        (("async",), ArrivalSchedule()),
        (("fedbuff", 3), BufferSchedule(3)),
    ],
)
def test_schedules_match_the_reference_code(scheme, schedule):
    tau = [0.93, 0.71, 0.55, 0.38, 0.21, 0.87]  # no exact ties or multiples of delta_t
    ours = as_matrix(simulate(schedule, tau, time_budget=6.0), len(tau))
    np.testing.assert_array_equal(ours, reference_schedule(scheme, tau, 6.0))


def test_fedfix_with_period_at_least_the_slowest_is_synchronous():
    tau = [0.93, 0.71, 0.55]
    fix = simulate(FixedPeriodSchedule(1.0), tau, time_budget=5.0)
    sync = simulate(SyncSchedule(), tau, max_aggregations=5)
    assert [sorted((d.cid, d.version) for d in f) for _, f in fix] == [
        sorted((d.cid, d.version) for d in s) for _, s in sync
    ]


def test_timeline_budget_and_errors():
    tl = Timeline(ArrivalSchedule(), time_budget=0.4)
    tl.dispatch(0, duration=0.5)
    assert tl.peek() is None  # the only update would land after the budget
    with pytest.raises(ValueError, match="already training"):
        tl.dispatch(0, duration=0.1)
    with pytest.raises(ValueError, match="time budget"):
        Timeline(SyncSchedule())
    tl = Timeline(FixedPeriodSchedule(0.2), time_budget=0.6)
    tl.dispatch(0, duration=0.6)
    times = []
    while (agg := tl.peek()) is not None:
        times.append((agg.time, agg.cids))
        tl.advance(agg)
    # 3 * 0.2 = 0.6000000000000001 still counts as the budget, and the return at 0.6 is in it
    assert [c for _, c in times] == [(), (), (0,)]


def test_version_store_keeps_exactly_what_in_flight_clients_hold():
    store = VersionStore()
    store.set_current(0, "v0")
    store.acquire(0)
    store.acquire(0)
    store.set_current(1, "v1")
    assert store.held() == [0, 1]
    store.release(0)
    assert store.held() == [0, 1] and store.holders(0) == 1
    store.release(0)
    assert store.held() == [1]
    store.set_current(2, "v2")  # nobody holds 1: freed at once
    assert store.held() == [2]
    with pytest.raises(ValueError, match="not held"):
        store.release(2)
    with pytest.raises(KeyError):
        store.get(0)


@pytest.mark.parametrize(
    ("n", "cfg"),
    [
        (50, LocalTrainConfig(steps=10, batch_size=16)),
        (5, LocalTrainConfig(steps=3, batch_size=16)),
        (64, LocalTrainConfig(steps=4, batch_size=16)),
        (37, LocalTrainConfig(epochs=3, batch_size=8)),
    ],
)
def test_planned_work_is_what_training_reports(n, cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    res = train_local(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert planned_work(cfg, n) == res.examples_processed
    assert planned_work(object(), n) is None
