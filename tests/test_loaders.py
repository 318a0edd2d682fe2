import gzip
import pickle
import struct

import datasets
import numpy as np
import pytest
from PIL import Image

from fedopt.data import load_task_data
from fedopt.data.images import read_idx
from fedopt.errors import ConfigError


def _load(name, mapping, *, test_fraction=0.25, seed=0):
    return load_task_data(name, mapping, test_fraction=test_fraction, seed=seed)


def _config_key(name, mapping, **kw):
    with pytest.raises(ConfigError) as err:
        _load(name, mapping, **kw)
    return err.value.key


# ---------------------------------------------------------------- npz


def test_npz_with_test_file_exact_arrays(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(6, 2, 2)
    y = np.array([0, 1, 2, 1, 0, 2])
    ids = np.array([10, 10, 11, 11, 12, 12])
    np.savez(tmp_path / "train.npz", feats=x, labels=y, user=ids)
    np.savez(tmp_path / "test.npz", feats=-x[:2], labels=np.array([3, 0]))
    task = _load(
        "npz",
        {
            "path": str(tmp_path / "train.npz"),
            "x_key": "feats",
            "y_key": "labels",
            "test_path": str(tmp_path / "test.npz"),
            "natural_id_key": "user",
        },
    )
    assert task.name == "npz"
    np.testing.assert_array_equal(task.train.x, x.astype(np.float32))
    assert task.train.x.dtype == np.float32 and task.train.input_shape == (2, 2)
    np.testing.assert_array_equal(task.train.y, y)
    np.testing.assert_array_equal(task.train.natural_id, ids)
    np.testing.assert_array_equal(task.test.x, -x[:2].astype(np.float32))
    np.testing.assert_array_equal(task.test.y, [3, 0])
    # num_classes = max label over train and test + 1
    assert task.train.num_classes == task.test.num_classes == 4


def test_npz_holdout(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.repeat([0, 1], 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = _load("npz", {"path": str(tmp_path / "d.npz")}, test_fraction=0.2, seed=1)
    assert (len(task.train), len(task.test)) == (16, 4)
    np.testing.assert_array_equal(np.bincount(task.test.y), [2, 2])
    both = np.concatenate([task.train.x, task.test.x])
    np.testing.assert_array_equal(np.sort(both[:, 0]), x[:, 0])
    # each row keeps its label
    np.testing.assert_array_equal(task.train.y, (task.train.x[:, 0] >= 20).astype(int))
    again = _load("npz", {"path": str(tmp_path / "d.npz")}, test_fraction=0.2, seed=1)
    np.testing.assert_array_equal(task.test.x, again.test.x)


def test_npz_errors_are_named(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]), z=np.zeros((4, 5)))
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 3)), y=np.array([0, -1]))
    np.savez(tmp_path / "frac.npz", x=np.zeros((2, 3)), y=np.array([0.0, 1.5]))
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 3)), y=np.array([0, 1]))
    assert _config_key("npz", {"path": str(tmp_path / "missing.npz")}) == "data.path"
    assert _config_key("npz", {"path": str(tmp_path)}) == "data.path"
    assert _config_key("npz", {"path": str(tmp_path / "text.npz")}) == "data.path"
    assert _config_key("npz", {"path": str(tmp_path / "len.npz")}) == "data.path"
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3)), y=np.zeros(0, dtype=int))
    assert _config_key("npz", {"path": str(tmp_path / "empty.npz")}) == "data.path"
    assert _config_key("npz", {"path": str(good), "x_key": "xx"}) == "data.x_key"
    assert _config_key("npz", {"path": str(good), "y_key": "yy"}) == "data.y_key"
    assert _config_key("npz", {"path": str(good), "natural_id_key": "u"}) == "data.natural_id_key"
    assert _config_key("npz", {"path": str(tmp_path / "neg.npz")}) == "data.y_key"
    assert _config_key("npz", {"path": str(tmp_path / "frac.npz")}) == "data.y_key"
    assert _config_key("npz", {"path": str(good), "test_path": "nope.npz"}) == "data.test_path"
    mismatch = {"path": str(good), "test_path": str(good), "x_key": "x"}
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 5)), y=np.array([0, 1, 0, 1]))
    mismatch["test_path"] = str(tmp_path / "wide.npz")
    assert _config_key("npz", mismatch) == "data.test_path"
    # path is required: a missing one is a named error, not a TypeError
    assert _config_key("npz", {}) == "data.path"
    assert _config_key("npz", {"path": ""}) == "data.path"


# ---------------------------------------------------------------- csv


def test_csv_with_ids_and_test_file(tmp_path):
    (tmp_path / "train.csv").write_text(
        "a,label,user,b\n0.5,1,u1,2\n1.5,0,u2,-3\n2.5,2,u1,4.25\n",
    )
    (tmp_path / "test.csv").write_text("b,a,label\n7,8,1\n")
    task = _load(
        "csv",
        {
            "path": str(tmp_path / "train.csv"),
            "test_path": str(tmp_path / "test.csv"),
            "natural_id_column": "user",
        },
    )
    np.testing.assert_array_equal(task.train.x, [[0.5, 2.0], [1.5, -3.0], [2.5, 4.25]])
    np.testing.assert_array_equal(task.train.y, [1, 0, 2])
    np.testing.assert_array_equal(task.train.natural_id, ["u1", "u2", "u1"])
    # test columns are matched by name, not position
    np.testing.assert_array_equal(task.test.x, [[8.0, 7.0]])
    np.testing.assert_array_equal(task.test.y, [1])
    assert task.train.num_classes == 3 and task.train.x.dtype == np.float32


def test_csv_custom_label_column_and_holdout(tmp_path):
    rows = "\n".join(f"{i},{i % 2},{i * 10}" for i in range(10))
    (tmp_path / "d.csv").write_text("f1,cls,grp\n" + rows + "\n")
    task = _load(
        "csv",
        {"path": str(tmp_path / "d.csv"), "label_column": "cls", "natural_id_column": "grp"},
        test_fraction=0.2,
    )
    assert (len(task.train), len(task.test)) == (8, 2)
    assert task.train.input_shape == (1,)
    np.testing.assert_array_equal(task.train.y, task.train.x[:, 0].astype(int) % 2)
    # integer-looking natural ids become int64
    assert task.train.natural_id.dtype == np.int64
    np.testing.assert_array_equal(task.train.natural_id, task.train.x[:, 0].astype(int) * 10)


def test_csv_errors_are_named(tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    assert _config_key("csv", {"path": str(tmp_path / "none.csv")}) == "data.path"
    assert _config_key("csv", {"path": write("h.csv", "a,label\n")}) == "data.path"
    assert _config_key("csv", {"path": write("r.csv", "a,label\n1,0\n2\n")}) == "data.path"
    assert _config_key("csv", {"path": write("n.csv", "a,label\n1,0\nx,1\n")}) == "data.path"
    assert _config_key("csv", {"path": write("l.csv", "a,y\n1,0\n")}) == "data.label_column"
    assert _config_key("csv", {"path": write("o.csv", "label\n1\n")}) == "data.path"
    assert _config_key("csv", {"path": write("f.csv", "a,label\n1,0.5\n")}) == "data.label_column"
    assert _config_key("csv", {"path": write("s.csv", "a,label\n1,cat\n")}) == "data.label_column"
    good = write("g.csv", "a,label\n1,0\n2,1\n")
    assert _config_key("csv", {"path": good, "natural_id_column": "u"}) == "data.natural_id_column"
    bad_test = write("t.csv", "b,label\n1,0\n")
    assert _config_key("csv", {"path": good, "test_path": bad_test}) == "data.test_path"


# ---------------------------------------------------------------- mnist idx


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_mnist(folder, train_img, train_lab, test_img, test_lab, gz=("train",)):
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": train_img,
        "train-labels-idx1-ubyte": train_lab,
        "t10k-images-idx3-ubyte": test_img,
        "t10k-labels-idx1-ubyte": test_lab,
    }
    for name, arr in files.items():
        data = _idx(arr)
        if name.startswith(gz):
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def test_mnist_idx_plain_and_gzipped_exact(tmp_path):
    rng = np.random.default_rng(0)
    train_img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    test_img = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)
    train_lab = np.array([0, 3, 1, 2, 3], dtype=np.uint8)
    test_lab = np.array([4, 0], dtype=np.uint8)
    _write_mnist(tmp_path / "m", train_img, train_lab, test_img, test_lab)
    task = _load("mnist", {"path": str(tmp_path / "m")})
    assert task.name == "mnist"
    assert task.train.x.shape == (5, 1, 4, 3) and task.test.x.shape == (2, 1, 4, 3)
    np.testing.assert_array_equal(task.train.x[:, 0], train_img.astype(np.float32) / 255)
    np.testing.assert_array_equal(task.test.x[:, 0], test_img.astype(np.float32) / 255)
    np.testing.assert_array_equal(task.train.y, train_lab)
    np.testing.assert_array_equal(task.test.y, test_lab)
    assert task.train.num_classes == 5 and task.train.y.dtype == np.int64


def test_read_idx_other_types(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3) - 3
    (tmp_path / "a").write_bytes(_idx(arr, 0x0C))
    out = read_idx(tmp_path / "a")
    np.testing.assert_array_equal(out, arr)
    assert out.shape == (2, 3)


def test_mnist_errors_are_named(tmp_path):
    img = np.zeros((2, 2, 2), dtype=np.uint8)
    lab = np.array([0, 1], dtype=np.uint8)
    assert _config_key("mnist", {"path": str(tmp_path / "nowhere")}) == "data.path"
    _write_mnist(tmp_path / "partial", img, lab, img, lab, gz=())
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte").unlink()
    assert _config_key("mnist", {"path": str(tmp_path / "partial")}) == "data.path"
    _write_mnist(tmp_path / "magic", img, lab, img, lab, gz=())
    (tmp_path / "magic" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x03" + b"\0" * 20)
    assert _config_key("mnist", {"path": str(tmp_path / "magic")}) == "data.path"
    _write_mnist(tmp_path / "short", img, lab, img, lab, gz=())
    (tmp_path / "short" / "train-images-idx3-ubyte").write_bytes(_idx(img)[:-1])
    assert _config_key("mnist", {"path": str(tmp_path / "short")}) == "data.path"
    _write_mnist(tmp_path / "count", img, np.array([0], dtype=np.uint8), img, lab, gz=())
    assert _config_key("mnist", {"path": str(tmp_path / "count")}) == "data.path"
    _write_mnist(tmp_path / "gz", img, lab, img, lab, gz=())
    (tmp_path / "gz" / "train-images-idx3-ubyte").unlink()
    (tmp_path / "gz" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    assert _config_key("mnist", {"path": str(tmp_path / "gz")}) == "data.path"


# ---------------------------------------------------------------- cifar10


def _cifar_batch(path, data, labels):
    with path.open("wb") as fh:
        pickle.dump({b"data": data, b"labels": list(labels), b"batch_label": b"x"}, fh)


def test_cifar10_batches_from_dir_and_parent(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    b1 = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    b3 = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    bt = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    _cifar_batch(folder / "data_batch_1", b1, [0, 9, 4])
    _cifar_batch(folder / "data_batch_3", b3, [1, 1])
    _cifar_batch(folder / "test_batch", bt, [2, 3])
    for path in (folder, tmp_path):
        task = _load("cifar10", {"path": str(path)})
        assert task.name == "cifar10"
        assert task.train.x.shape == (5, 3, 32, 32) and task.test.x.shape == (2, 3, 32, 32)
        expected = np.concatenate([b1, b3]).reshape(5, 3, 32, 32).astype(np.float32) / 255
        np.testing.assert_array_equal(task.train.x, expected)
        np.testing.assert_array_equal(task.train.y, [0, 9, 4, 1, 1])
        np.testing.assert_array_equal(task.test.y, [2, 3])
        np.testing.assert_array_equal(
            task.test.x[1, 2, 31], bt[1, 2048 + 31 * 32 :].astype(np.float32) / 255
        )
        assert task.train.num_classes == 10


def test_cifar10_errors_are_named(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    assert _config_key("cifar10", {"path": str(tmp_path / "none")}) == "data.path"
    _cifar_batch(folder / "data_batch_1", np.zeros((1, 3072), np.uint8), [0])
    assert _config_key("cifar10", {"path": str(folder)}) == "data.path"  # no test_batch
    (folder / "test_batch").write_bytes(b"garbage")
    assert _config_key("cifar10", {"path": str(folder)}) == "data.path"
    _cifar_batch(folder / "test_batch", np.zeros((1, 100), np.uint8), [0])
    assert _config_key("cifar10", {"path": str(folder)}) == "data.path"
    _cifar_batch(folder / "test_batch", np.zeros((1, 3072), np.uint8), [12])
    assert _config_key("cifar10", {"path": str(folder)}) == "data.path"
    only_test = tmp_path / "t"
    only_test.mkdir()
    _cifar_batch(only_test / "test_batch", np.zeros((1, 3072), np.uint8), [0])
    assert _config_key("cifar10", {"path": str(only_test)}) == "data.path"


# ---------------------------------------------------------------- Hugging Face


def test_hf_dataset_dict_with_images_and_class_label(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (4, 3, 2), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 3, 2, 3), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=7)}
    )
    train = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in gray], "label": [0, 1, 2, 1]}, features=features
    )
    test = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in gray[:1]], "label": [3]}, features=features
    )
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "g"))
    task = _load("hf", {"path": str(tmp_path / "g"), "feature_column": "img"})
    assert task.name == "hf"
    assert task.train.x.shape == (4, 1, 3, 2)
    np.testing.assert_array_equal(task.train.x[:, 0], gray.astype(np.float32) / 255)
    np.testing.assert_array_equal(task.train.y, [0, 1, 2, 1])
    np.testing.assert_array_equal(task.test.y, [3])
    assert task.train.num_classes == 7  # from the ClassLabel feature, not max + 1

    color = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in rgb], "label": [0, 1]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": color, "test": color}).save_to_disk(str(tmp_path / "c"))
    task = _load("hf", {"path": str(tmp_path / "c"), "feature_column": "img"})
    assert task.train.x.shape == (2, 3, 3, 2)  # HWC -> CHW
    np.testing.assert_array_equal(task.train.x, rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert task.train.num_classes == 2


def test_hf_single_dataset_lists_and_ids(tmp_path):
    n = 12
    x = [[[float(i), 1.0], [2.0, -float(i)]] for i in range(n)]
    ds = datasets.Dataset.from_dict(
        {"x": x, "target": [i % 3 for i in range(n)], "who": [f"w{i % 4}" for i in range(n)]}
    )
    ds.save_to_disk(str(tmp_path / "s"))
    task = _load(
        "hf",
        {"path": str(tmp_path / "s"), "label_column": "target", "natural_id_column": "who"},
        test_fraction=0.25,
    )
    assert (len(task.train), len(task.test)) == (9, 3)
    assert task.train.input_shape == (2, 2) and task.train.num_classes == 3
    row = task.train.x[:, 0, 0].astype(int)
    np.testing.assert_array_equal(task.train.y, row % 3)
    np.testing.assert_array_equal(task.train.x[:, 1, 1], -row)
    np.testing.assert_array_equal(task.train.natural_id, [f"w{i % 4}" for i in row])
    assert task.train.name == f"hf data at {tmp_path / 's'}"
    # a column of plain numbers gives one feature per example
    scalar = _load(
        "hf", {"path": str(tmp_path / "s"), "feature_column": "target", "label_column": "target"}
    )
    assert scalar.train.input_shape == (1,)
    np.testing.assert_array_equal(scalar.train.x[:, 0], scalar.train.y)


def test_hf_errors_are_named(tmp_path):
    assert _config_key("hf", {"path": str(tmp_path / "none")}) == "data.path"
    (tmp_path / "empty").mkdir()
    assert _config_key("hf", {"path": str(tmp_path / "empty")}) == "data.path"
    ds = datasets.Dataset.from_dict({"x": [[1.0], [2.0]], "label": [0, -1], "t": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "d"))
    path = str(tmp_path / "d")
    assert _config_key("hf", {"path": path, "feature_column": "f"}) == "data.feature_column"
    assert _config_key("hf", {"path": path, "feature_column": "t"}) == "data.feature_column"
    assert _config_key("hf", {"path": path, "label_column": "y"}) == "data.label_column"
    assert _config_key("hf", {"path": path}) == "data.label_column"  # label -1
    assert _config_key("hf", {"path": path, "natural_id_column": "u"}) == "data.natural_id_column"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "v"))
    assert _config_key("hf", {"path": str(tmp_path / "v")}) == "data.path"
