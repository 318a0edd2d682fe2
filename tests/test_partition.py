import warnings

import numpy as np
import pytest

from fedopt.data import (
    Dataset,
    label_histogram,
    load_task_data,
    partition_clients,
    plot_label_heatmap,
    split_client,
)
from fedopt.data.partition import DirichletParams, PathologicalParams, lognormal_sizes
from fedopt.errors import ConfigError
from fedopt.registry import PARTITIONERS


@pytest.fixture(scope="module")
def digits():
    return load_task_data("digits", None, test_fraction=0.2, seed=0).train


def _small(n=100, classes=5, ids=None):
    return Dataset(np.arange(2 * n).reshape(n, 2), np.arange(n) % classes, classes, ids, "small")


def _is_permutation(parts, n):
    flat = np.concatenate(parts)
    return len(flat) == n and np.array_equal(np.sort(flat), np.arange(n))


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _key(train, name, params, num_clients, seed=0):
    with pytest.raises(ConfigError) as err:
        partition_clients(train, name, params, num_clients=num_clients, seed=seed)
    return err.value


def test_registered_partitioners():
    assert PARTITIONERS.names() == [
        "dirichlet",
        "iid",
        "natural",
        "pathological",
        "quantity",
        "shards",
    ]


def test_iid_sizes_union_and_seed(digits):
    parts = partition_clients(digits, "iid", None, num_clients=10, seed=1)
    assert [len(p) for p in parts] == [144] * 7 + [143] * 3
    assert _is_permutation(parts, 1437)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = partition_clients(digits, "iid", None, num_clients=10, seed=1)
    other = partition_clients(digits, "iid", None, num_clients=10, seed=2)
    assert _same(parts, again)
    assert not _same(parts, other)
    # iid: every client sees all 10 classes of digits
    assert np.all(label_histogram(digits.y, parts, 10) > 0)


def test_dirichlet_union_determinism_and_seed(digits):
    params = DirichletParams(alpha=0.5)
    parts = partition_clients(digits, "dirichlet", params, num_clients=10, seed=3)
    assert _is_permutation(parts, 1437)
    assert min(len(p) for p in parts) >= 2
    again = partition_clients(digits, "dirichlet", {"alpha": 0.5}, num_clients=10, seed=3)
    other = partition_clients(digits, "dirichlet", params, num_clients=10, seed=4)
    assert _same(parts, again)
    assert [len(p) for p in parts] != [len(p) for p in other]


def _skew(digits, alpha):
    parts = partition_clients(digits, "dirichlet", {"alpha": alpha}, num_clients=10, seed=0)
    hist = label_histogram(digits.y, parts, 10).astype(float)
    share = hist / hist.sum(axis=1, keepdims=True)
    logs = np.log(np.where(share > 0, share, 1.0))
    entropy = -(share * logs).sum(axis=1)
    return share.max(axis=1).mean(), entropy.mean()


def test_dirichlet_alpha_controls_label_skew(digits):
    share_low, entropy_low = _skew(digits, 0.05)
    share_high, entropy_high = _skew(digits, 100.0)
    assert share_low > 0.5 and share_high < 0.2
    assert entropy_low < 1.2 < 2.0 < entropy_high <= np.log(10)


def test_dirichlet_errors(digits):
    err = _key(digits, "dirichlet", {"alpha": 0.0}, 10)
    assert err.key == "partition.alpha"
    err = _key(digits, "dirichlet", {"alpha": -1.0}, 10)
    assert err.key == "partition.alpha"
    with pytest.raises(ConfigError) as direct:
        DirichletParams(alpha=0.0)
    assert direct.value.key == "alpha"
    # flwr-datasets gives up after 10 draws: the error names the knobs to change
    err = _key(digits, "dirichlet", {"alpha": 0.01, "min_partition_size": 140}, 10)
    assert err.key == "partition.min_partition_size" and "partition.alpha" in err.allowed
    # with no minimum size, tiny alpha leaves clients empty: a named error
    err = _key(digits, "dirichlet", {"alpha": 0.01, "min_partition_size": 0}, 50)
    assert err.key == "partition.name" and err.value == "dirichlet"
    assert "fewer clients" in err.allowed


def test_pathological_classes_per_client(digits):
    parts = partition_clients(
        digits, "pathological", PathologicalParams(classes_per_client=2), num_clients=10, seed=0
    )
    assert _is_permutation(parts, 1437)
    hist = label_histogram(digits.y, parts, 10)
    assert np.all((hist > 0).sum(axis=1) <= 2)
    # first-deterministic: client i holds class i
    assert np.all(hist[np.arange(10), np.arange(10)] > 0)
    det = partition_clients(
        digits,
        "pathological",
        {"classes_per_client": 3, "class_assignment_mode": "deterministic"},
        num_clients=10,
        seed=0,
    )
    hist = label_histogram(digits.y, det, 10)
    for i in range(10):
        assert set(np.flatnonzero(hist[i])) == {i, (i + 1) % 10, (i + 2) % 10}
    err = _key(digits, "pathological", {"classes_per_client": 11}, 10)
    assert err.key == "partition.classes_per_client"
    err = _key(digits, "pathological", {"classes_per_client": 0}, 10)
    assert err.key == "partition.classes_per_client"
    err = _key(digits, "pathological", {"class_assignment_mode": "randon"}, 10)
    assert err.key == "partition.class_assignment_mode" and "random" in err.allowed


def test_pathological_unused_classes_warn(digits):
    with pytest.warns(UserWarning, match="unassigned"):
        parts = partition_clients(digits, "pathological", None, num_clients=3, seed=0)
    assert len(parts) == 3


def test_shards_sizes_and_labels(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = partition_clients(digits, "shards", None, num_clients=10, seed=0)
    # shard size int(1437 / 20) = 71, two shards each
    assert [len(p) for p in parts] == [142] * 10
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == 1420
    # label-sorted shards: a client sees few classes
    assert (label_histogram(digits.y, parts, 10) > 0).sum(axis=1).max() <= 4
    small = _small(100)
    parts = partition_clients(small, "shards", {"shard_size": 25}, num_clients=2, seed=0)
    assert [len(p) for p in parts] == [50, 50] and _is_permutation(parts, 100)
    err = _key(small, "shards", {"shard_size": 30}, 2)
    assert err.key == "partition.shards_per_client"
    err = _key(small, "shards", {"shards_per_client": 2}, 60)  # 120 shards of 0 examples
    assert err.key == "partition.shards_per_client"


def test_lognormal_sizes_exact():
    # sigma 0: equal weights; 7 left after one each, 7/3 -> 2 each, remainder to client 0
    assert lognormal_sizes(10, num_clients=3, sigma=0.0, seed=0) == [4, 3, 3]
    sizes = lognormal_sizes(1000, num_clients=20, sigma=2.0, seed=5)
    assert sum(sizes) == 1000 and min(sizes) >= 1
    assert sizes == lognormal_sizes(1000, num_clients=20, sigma=2.0, seed=5)
    assert sizes != lognormal_sizes(1000, num_clients=20, sigma=2.0, seed=6)


def test_quantity_partitioners(digits):
    parts = partition_clients(digits, "quantity", None, num_clients=10, seed=7)
    assert [len(p) for p in parts] == lognormal_sizes(1437, num_clients=10, sigma=1.0, seed=7)
    assert _is_permutation(parts, 1437)
    again = partition_clients(digits, "quantity", None, num_clients=10, seed=7)
    assert _same(parts, again)
    small = _small(100)
    linear = partition_clients(small, "quantity", {"distribution": "linear"}, num_clients=4, seed=0)
    assert [len(p) for p in linear] == [10, 20, 30, 40] and _is_permutation(linear, 100)
    # square: 100 * [1, 4, 9, 16] / 30 truncated, remainder to the last client
    square = partition_clients(small, "quantity", {"distribution": "square"}, num_clients=4, seed=0)
    assert [len(p) for p in square] == [3, 13, 30, 54]
    # shuffled first: a contiguous slice is not a run of consecutive indices
    assert not np.array_equal(linear[0], np.arange(10))
    err = _key(small, "quantity", {"distribution": "exponential"}, 30)
    assert err.key == "partition.num_clients"
    err = _key(small, "quantity", {"distribution": "zipf"}, 3)
    assert err.key == "partition.distribution"


def test_natural_partition_one_client_per_id():
    ids = np.array(["b", "a", "c", "a", "b", "a"])
    ds = Dataset(np.zeros((6, 1)), [0, 1, 0, 1, 0, 1], 2, ids, "toy")
    parts = partition_clients(ds, "natural", None, num_clients=3, seed=0)
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]
    synth = load_task_data("synthetic", {"num_users": 6}, test_fraction=0.2, seed=0).train
    parts = partition_clients(synth, "natural", None, num_clients=6, seed=0)
    assert _is_permutation(parts, len(synth))
    for user, part in enumerate(parts):
        assert np.all(synth.natural_id[part] == user)
    err = _key(ds, "natural", None, 2)
    assert err.key == "partition.num_clients" and "exactly the 3 natural ids" in err.allowed
    err = _key(_small(10), "natural", None, 2)
    assert err.key == "partition.name" and err.value == "natural"
    assert "small has none" in err.allowed


def test_general_partition_errors(digits):
    err = _key(digits, "iid", None, 1438)
    assert err.key == "partition.num_clients" and err.value == 1438
    assert err.allowed == "at most the 1437 training examples of digits"
    assert _key(digits, "iid", None, 0).key == "partition.num_clients"
    err = _key(digits, "dirichlett", None, 3)
    assert err.key == "partition.name" and "dirichlet" in err.allowed
    assert _key(digits, "iid", {"alpha": 1.0}, 3).key == "partition.alpha"


def test_split_client_sizes_and_determinism():
    idx = np.arange(10) * 3 + 1
    train, test = split_client(idx, test_fraction=0.3, seed=1, cid=4)
    assert len(test) == 3 and len(train) == 7
    assert np.array_equal(np.sort(np.concatenate([train, test])), idx)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = split_client(idx, test_fraction=0.3, seed=1, cid=4)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    others = [split_client(idx, test_fraction=0.3, seed=1, cid=c)[1] for c in range(5, 9)]
    assert any(not np.array_equal(test, o) for o in others)
    train, test = split_client(idx, test_fraction=0.0, seed=1, cid=0)
    assert np.array_equal(train, idx) and test.dtype == np.int64 and len(test) == 0
    # round(0.9 * 2) = 2, but train keeps one
    train, test = split_client(np.array([5, 9]), test_fraction=0.9, seed=0, cid=0)
    assert len(train) == 1 and len(test) == 1
    train, test = split_client(np.array([5]), test_fraction=0.9, seed=0, cid=0)
    assert train.tolist() == [5] and len(test) == 0
    with pytest.raises(ConfigError) as err:
        split_client(idx, test_fraction=1.0, seed=0, cid=0)
    assert err.value.key == "partition.test_fraction"


def test_label_histogram_exact():
    y = np.array([0, 1, 1, 2, 2, 2, 0])
    hist = label_histogram(y, [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([6])], 4)
    assert hist.dtype == np.int64
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0], [1, 0, 0, 0]]
    assert label_histogram(y, [], 3).shape == (0, 3)


def test_heatmap_written(tmp_path, digits):
    parts = partition_clients(digits, "dirichlet", None, num_clients=5, seed=0)
    hist = label_histogram(digits.y, parts, 10)
    out = plot_label_heatmap(hist, tmp_path / "figs" / "labels.png", title="dirichlet 0.5")
    assert out == tmp_path / "figs" / "labels.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    big = plot_label_heatmap(np.ones((60, 12), dtype=np.int64), tmp_path / "big.png", title="t")
    assert big.stat().st_size > 1000
