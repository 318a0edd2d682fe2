import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedopt.data import Dataset, TaskData, load_task_data
from fedopt.data.builtin import BlobsParams, SyntheticParams
from fedopt.errors import ConfigError
from fedopt.params import build
from fedopt.registry import DATASETS, load_builtins


def _rows(ds: Dataset) -> np.ndarray:
    """Rows of x and y as a sorted structured view, to compare multisets of examples."""
    flat = np.concatenate([ds.x.reshape(len(ds), -1), ds.y[:, None].astype(np.float32)], axis=1)
    return flat[np.lexsort(flat.T[::-1])]


def _pool(task: TaskData) -> Dataset:
    x = np.concatenate([task.train.x, task.test.x])
    y = np.concatenate([task.train.y, task.test.y])
    ids = None
    if task.train.natural_id is not None:
        ids = np.concatenate([task.train.natural_id, task.test.natural_id])
    return Dataset(x, y, task.train.num_classes, ids)


def test_registry_holds_every_builtin_and_file_loader():
    load_builtins()  # the text and pretrain modules register theirs on import
    assert DATASETS.names() == [
        "blobs",
        "cifar10",
        "csv",
        "digits",
        "hf",
        "lazy_synthetic",
        "mnist",
        "npz",
        "public_split",
        "stdlib_docs",
        "synthetic",
        "text_files",
    ]


def test_digits_shapes_dtypes_range_and_holdout():
    task = load_task_data("digits", None, test_fraction=0.2, seed=0)
    assert task.name == "digits"
    assert task.train.name == task.test.name == "digits"
    # sklearn's train_test_split puts ceil(0.2 * 1797) = 360 examples in the test set
    assert (len(task.train), len(task.test)) == (1437, 360)
    assert task.train.x.shape == (1437, 1, 8, 8) and task.test.x.shape == (360, 1, 8, 8)
    assert task.train.input_shape == (1, 8, 8)
    assert task.train.x.dtype == np.float32 and task.train.y.dtype == np.int64
    assert task.train.num_classes == task.test.num_classes == 10
    assert task.train.natural_id is None
    both = np.concatenate([task.train.x, task.test.x])
    assert both.min() == 0.0 and both.max() == 1.0
    # the holdout is a split of the bundled digits: same examples, pixels / 16
    ref = load_digits()
    ref_ds = Dataset((ref.images / 16.0)[:, None], ref.target, 10)
    np.testing.assert_array_equal(_rows(_pool(task)), _rows(ref_ds))
    # stratified: each class's test count is within one of 20% of its total
    total = np.bincount(ref.target, minlength=10)
    assert np.all(np.abs(np.bincount(task.test.y, minlength=10) - 0.2 * total) <= 1)


def test_digits_holdout_is_seeded():
    a = load_task_data("digits", None, test_fraction=0.3, seed=5)
    b = load_task_data("digits", None, test_fraction=0.3, seed=5)
    c = load_task_data("digits", None, test_fraction=0.3, seed=6)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert len(a.test) == len(c.test) == 540
    assert not np.array_equal(a.test.x, c.test.x)


def test_synthetic_is_deterministic_bitwise():
    a = load_task_data("synthetic", {"num_users": 8}, test_fraction=0.25, seed=3)
    b = load_task_data("synthetic", SyntheticParams(num_users=8), test_fraction=0.25, seed=3)
    c = load_task_data("synthetic", {"num_users": 8}, test_fraction=0.25, seed=4)
    for part in ("train", "test"):
        for field in ("x", "y", "natural_id"):
            assert (
                getattr(getattr(a, part), field).tobytes()
                == getattr(getattr(b, part), field).tobytes()
            )
    assert not np.array_equal(a.train.x[:50], c.train.x[:50])


def test_synthetic_shapes_ids_and_sample_counts():
    p = {"num_users": 12, "dim": 7, "num_classes": 5, "max_samples_per_user": 50}
    task = load_task_data("synthetic", p, test_fraction=0.2, seed=0)
    pool = _pool(task)
    # lognormal(4, 2) + 50 >= 50, capped at 50: every user has exactly 50 examples
    assert len(pool) == 600
    assert len(task.test) == 120 and len(task.train) == 480
    assert task.train.x.shape == (480, 7) and task.train.x.dtype == np.float32
    assert task.train.natural_id.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(pool.natural_id), np.full(12, 50))
    assert task.train.num_classes == 5 and pool.y.max() < 5

    task = load_task_data("synthetic", {"max_samples_per_user": 60}, test_fraction=0.2, seed=1)
    counts = np.bincount(_pool(task).natural_id, minlength=30)
    assert counts.min() >= 50 and counts.max() <= 60


def _per_user_label_tv(task: TaskData) -> float:
    pool = _pool(task)
    users = np.unique(pool.natural_id)
    dist = np.stack([np.bincount(pool.y[pool.natural_id == u], minlength=10) for u in users])
    dist = dist / dist.sum(axis=1, keepdims=True)
    pairs = [(i, j) for i in range(len(users)) for j in range(i + 1, len(users))]
    return float(np.mean([0.5 * np.abs(dist[i] - dist[j]).sum() for i, j in pairs]))


def test_synthetic_users_are_non_iid_and_iid_variant_is_not():
    non_iid = load_task_data("synthetic", {"alpha": 1.0, "beta": 1.0}, test_fraction=0.2, seed=0)
    iid = load_task_data("synthetic", {"iid": True}, test_fraction=0.2, seed=0)
    # mean total-variation distance between users' label distributions
    assert _per_user_label_tv(non_iid) > 0.6
    assert _per_user_label_tv(iid) < 0.3


def test_synthetic_feature_covariance_is_diag_j_pow_minus_1_2():
    p = {"iid": True, "num_users": 4, "dim": 10, "max_samples_per_user": 1000}
    task = load_task_data("synthetic", p, test_fraction=0.1, seed=2)
    x = _pool(task).x.astype(np.float64)
    # iid variant: zero feature mean, variance of feature j (1-based) is j ** -1.2
    expected = np.arange(1, 11) ** -1.2
    assert len(x) >= 200
    np.testing.assert_allclose(x.var(axis=0) / expected, 1.0, atol=0.25)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.2)


def test_blobs_sizes_and_stratified_holdout():
    task = load_task_data("blobs", None, test_fraction=0.2, seed=0)
    assert (len(task.train), len(task.test)) == (1600, 400)
    assert task.train.x.shape == (1600, 20) and task.train.x.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(task.test.y), [100, 100, 100, 100])
    np.testing.assert_array_equal(np.bincount(task.train.y), [400, 400, 400, 400])
    small = load_task_data(
        "blobs",
        {"num_examples": 90, "num_features": 3, "num_classes": 3},
        test_fraction=0.5,
        seed=1,
    )
    assert small.train.x.shape == (45, 3) and small.train.num_classes == 3
    again = load_task_data(
        "blobs",
        {"num_examples": 90, "num_features": 3, "num_classes": 3},
        test_fraction=0.5,
        seed=1,
    )
    assert small.train.x.tobytes() == again.train.x.tobytes()


@pytest.mark.parametrize(
    ("name", "mapping", "key"),
    [
        ("synthetic", {"alpha": -1.0}, "data.alpha"),
        ("synthetic", {"beta": -0.5}, "data.beta"),
        ("synthetic", {"num_users": 0}, "data.num_users"),
        ("synthetic", {"num_classes": 1}, "data.num_classes"),
        ("synthetic", {"max_samples_per_user": 0}, "data.max_samples_per_user"),
        ("synthetic", {"alpah": 1.0}, "data.alpah"),
        ("blobs", {"num_classes": 9, "num_features": 3}, "data.num_classes"),
        ("blobs", {"num_examples": 5}, "data.num_examples"),
        ("blobs", {"class_sep": 0.0}, "data.class_sep"),
        ("digits", {"size": 3}, "data.size"),
    ],
)
def test_bad_dataset_params_are_named(name, mapping, key):
    with pytest.raises(ConfigError) as err:
        load_task_data(name, mapping, test_fraction=0.2, seed=0)
    assert err.value.key == key


def test_params_classes_check_with_bare_keys():
    with pytest.raises(ConfigError) as err:
        SyntheticParams(alpha=-1.0)
    assert err.value.key == "alpha"
    with pytest.raises(ConfigError) as err:
        build(BlobsParams, {"num_features": "x"}, "data")
    assert err.value.key == "data.num_features"


def test_unknown_dataset_and_bad_test_fraction():
    with pytest.raises(ConfigError) as err:
        load_task_data("digitz", None, test_fraction=0.2, seed=0)
    assert err.value.key == "data.name" and "digits" in str(err.value)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError) as err:
            load_task_data("digits", None, test_fraction=fraction, seed=0)
        assert err.value.key == "data.test_fraction"


def test_dataset_type_subset_and_validation():
    ds = Dataset(np.arange(12).reshape(6, 2), [0, 1, 2, 0, 1, 2], 3, np.array(list("aabbcc")))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert len(ds) == 6 and ds.input_shape == (2,)
    sub = ds.subset(np.array([4, 1]))
    np.testing.assert_array_equal(sub.x, [[8, 9], [2, 3]])
    np.testing.assert_array_equal(sub.y, [1, 1])
    np.testing.assert_array_equal(sub.natural_id, ["c", "a"])
    assert sub.num_classes == 3
    with pytest.raises(ValueError):
        Dataset(np.zeros((3, 2)), [0, 1], 2)
    with pytest.raises(ValueError):
        Dataset(np.zeros((2, 2)), [0, 5], 2)
