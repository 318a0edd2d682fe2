"""Generated populations: clients from (seed, cid), tasks that never hold the population."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedopt.config import load_scenario, parse_scenario
from fedopt.data import split_client, split_sizes
from fedopt.data.population import SIZE_BLOCK, SyntheticUsers
from fedopt.errors import ConfigError
from fedopt.privacy.preflight import check_sample_level, train_sizes
from fedopt.registry import load_builtins
from fedopt.task import build_task

load_builtins()
ROOT = Path(__file__).resolve().parents[1]


def raw(num_clients=1000, data=None, partition=None, client=None, seed=5):
    return {
        "name": "population-test",
        "data": {"name": "lazy_synthetic", "dim": 6, "num_classes": 3, "test_users": 4}
        | (data or {}),
        "partition": {"name": "natural", "num_clients": num_clients, "test_fraction": 0.25}
        | (partition or {}),
        "model": {"name": "mlp", "hidden": [4]},
        "client": {"name": "sgd", "batch_size": 8, "lr": 0.1} | (client or {}),
        "run": {"rounds": 2, "seed": seed, "clients_per_round": 10, "fed_eval_clients": 5},
    }


def task_of(**kw):
    return build_task(parse_scenario(raw(**kw)))


def expected_user(seed, cid, *, stream=0, dim=6, classes=3, alpha=1.0, beta=1.0, cap=1000):
    """Synthetic(alpha, beta) user ``cid`` written out from the documented seeds."""
    sizes = np.random.default_rng([seed, stream, 0, cid // SIZE_BLOCK]).lognormal(4, 2, SIZE_BLOCK)
    n = min(int(sizes.astype(np.int64)[cid % SIZE_BLOCK]) + 50, cap)
    rng = np.random.default_rng([seed, 0, 1, cid])
    u, centre = rng.normal(0.0, alpha), rng.normal(0.0, beta)
    mean = rng.normal(centre, 1.0, dim)
    w, b = rng.normal(u, 1.0, (dim, classes)), rng.normal(u, 1.0, classes)
    if stream:
        rng = np.random.default_rng([seed, stream, 1, cid])
    x = mean + rng.standard_normal((n, dim)) * np.arange(1, dim + 1) ** (-0.6)
    return x.astype(np.float32), np.argmax(x @ w + b, axis=1)


def test_a_client_is_a_known_function_of_seed_and_cid():
    task = task_of(num_clients=10_000)
    for cid in (0, 1, 4095, 4096, 9999):
        x, y = expected_user(5, cid)
        pool = task.data.clients.client(cid)
        assert np.array_equal(pool.x, x) and np.array_equal(pool.y, y)
        train, test = task.client_data(cid)
        tr, te = split_client(np.arange(len(x)), test_fraction=0.25, seed=5, cid=cid)
        assert np.array_equal(train.x, x[tr]) and np.array_equal(test.y, y[te])
        assert len(train) + len(test) == len(x) and len(test) == round(0.25 * len(x))


def test_clients_are_identical_on_rebuild_and_differ_by_seed():
    a, b, c = task_of(), task_of(), task_of(seed=6)
    for cid in (0, 17, 999):
        (ax, _), (bx, _), (cx, _) = a.client_data(cid), b.client_data(cid), c.client_data(cid)
        assert np.array_equal(ax.x, bx.x) and np.array_equal(ax.y, bx.y)
        assert not np.array_equal(ax.x[:1], cx.x[:1])
    assert np.array_equal(a.data.test.x, b.data.test.x)


def test_the_test_set_is_held_out_examples_of_the_first_users_whatever_the_population():
    small, large = task_of(num_clients=10), task_of(num_clients=100_000)
    assert np.array_equal(small.data.test.x, large.data.test.x)
    held = [expected_user(5, k, stream=1) for k in range(4)]
    assert np.array_equal(small.data.test.x, np.concatenate([x for x, _ in held]))
    assert np.array_equal(small.data.test.y, np.concatenate([y for _, y in held]))
    assert not np.array_equal(small.data.test.x[:1], small.data.clients.client(0).x[:1])


def test_building_a_100k_task_generates_no_client(monkeypatch):
    made = []
    real = SyntheticUsers.client
    monkeypatch.setattr(
        SyntheticUsers, "client", lambda self, cid: made.append(self.stream) or real(self, cid)
    )
    task = task_of(num_clients=100_000)
    assert task.num_clients == 100_000
    assert made == [1] * 4  # the central test set's 4 users, no client
    assert task.parts == () and len(task.data.train) == 0
    assert task.input_shape == (6,) and task.num_classes == 3
    with pytest.raises(IndexError):
        task.client_data(100_000)


def test_train_sizes_match_the_clients_without_generating_them(monkeypatch):
    task = task_of(num_clients=5000)
    sizes = task.train_sizes()
    monkeypatch.setattr(SyntheticUsers, "client", None)
    assert sizes.shape == (5000,) and sizes.dtype == np.int64
    assert np.array_equal(train_sizes(task), sizes)
    monkeypatch.undo()
    for cid in (0, 4095, 4096, 4999):
        assert sizes[cid] == len(task.client_data(cid)[0])


def test_split_sizes_are_split_client_lengths():
    sizes = np.arange(0, 60)
    for fraction in (0.0, 0.1, 0.2, 0.25, 0.5, 0.9):
        train, test = split_sizes(sizes, test_fraction=fraction)
        for n in sizes:
            tr, te = split_client(np.arange(n), test_fraction=fraction, seed=1, cid=2)
            assert (train[n], test[n]) == (len(tr), len(te))
    with pytest.raises(ConfigError, match="partition.test_fraction = 1.0 is not allowed"):
        split_sizes(sizes, test_fraction=1.0)


def test_pooled_train_sizes_are_unchanged():
    pooled = raw(partition={"name": "dirichlet", "num_clients": 7})
    pooled["data"] = {"name": "blobs", "num_examples": 300, "num_features": 4}
    pooled["run"] |= {"clients_per_round": 7}
    task = build_task(parse_scenario(pooled))
    assert list(task.train_sizes()) == [len(task.client_data(c)[0]) for c in range(7)]


def test_dp_preflight_over_a_population_names_the_smallest_client():
    task = task_of(num_clients=20_000, client={"name": "dpsgd", "noise_multiplier": 1.0})
    facts = check_sample_level(task)
    sizes = task.train_sizes()
    assert facts["n_min"] == sizes.min()
    delta = 1.0 / int(sizes.min())
    with pytest.raises(ConfigError) as err:
        task_of(
            num_clients=20_000, client={"name": "dpsgd", "noise_multiplier": 1.0, "delta": delta}
        )
    cid = int(np.argmax(sizes == sizes.min()))
    assert f"(the smallest client, {cid}, has n_min = {sizes.min()}" in str(err.value)


@pytest.mark.parametrize(
    ("data", "partition", "message"),
    [
        ({"alpha": -1}, {}, "data.alpha = -1.0 is not allowed: a number >= 0"),
        ({"test_users": 0}, {}, "data.test_users = 0 is not allowed: an integer >= 1"),
        ({"num_classes": 1}, {}, "data.num_classes = 1 is not allowed: an integer >= 2"),
        (
            {},
            {"name": "iid"},
            "partition.name = 'iid' is not allowed: 'natural' for data.name = 'lazy_synthetic', "
            "whose clients are its generated users",
        ),
    ],
)
def test_bad_knobs_give_one_line_errors(data, partition, message):
    with pytest.raises(ConfigError) as err:
        task_of(data=data, partition=partition)
    assert str(err.value) == message and "\n" not in str(err.value)


def test_the_shipped_population_scenario_is_100k_clients_and_small_per_round():
    path = ROOT / "scenarios" / "population.toml"
    scenario = load_scenario(path)
    assert tomllib.loads(path.read_text())["data"]["name"] == "lazy_synthetic"
    assert scenario.partition.num_clients == 100_000
    assert scenario.clients_per_round == 100 and scenario.run.fed_eval_clients <= 100
    task = build_task(scenario)
    assert task.num_clients == 100_000 and task.parts == ()


def test_iid_users_share_one_labelling_seeded_by_the_run():
    task = task_of(data={"iid": True})
    shared = np.random.default_rng([5, 2])
    w, b = shared.normal(0.0, 1.0, (6, 3)), shared.normal(0.0, 1.0, 3)
    for cid in (0, 3, 700):
        pool = task.data.clients.client(cid)
        assert np.array_equal(pool.y, np.argmax(pool.x.astype(np.float64) @ w + b, axis=1))


def test_label_histograms_count_each_clients_examples():
    task = task_of()
    hist = task.label_histogram([3, 0, 999])
    assert hist.shape == (3, 3) and hist.dtype == np.int64
    for row, cid in zip(hist, (3, 0, 999), strict=True):
        assert list(row) == list(np.bincount(expected_user(5, cid)[1], minlength=3))
    pooled = raw(partition={"name": "dirichlet", "num_clients": 5})
    pooled["data"] = {"name": "blobs", "num_examples": 200, "num_features": 4}
    pooled["run"] |= {"clients_per_round": 5}
    ptask = build_task(parse_scenario(pooled))
    sizes = [len(p) for p in ptask.parts]
    assert list(ptask.label_histogram().sum(axis=1)) == sizes


def test_a_run_over_a_population_checkpoints_only_the_clients_it_touched():
    from inline import run_inline

    from fedopt import resumable

    rows, driver, grid = run_inline(parse_scenario(raw(num_clients=20000)))
    touched = driver.transport.contacted
    trained = {c for r in rows for c in r.get("clients", [])}
    assert trained <= touched and len(touched) <= 2 * (10 + 5)
    sent = len(grid.sent)
    states = resumable.export_clients(driver)
    assert len(grid.sent) - sent == len(touched)  # one export query per touched client
    assert set(states) <= touched
