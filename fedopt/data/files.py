"""Loaders for datasets in local files: npz, csv, HF save_to_disk; the helpers all loaders share."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedopt.data.core import Dataset, TaskData, holdout
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import DATASETS

__all__ = [
    "MAX_CLASSES",
    "CsvParams",
    "HfParams",
    "NpzParams",
    "PathParams",
    "load_csv",
    "load_hf",
    "load_npz",
]


def _existing(path: str, key: str = "data.path", *, is_dir: bool = False) -> Path:
    """Return ``Path(path)`` or raise when it is missing or of the wrong kind."""
    p = Path(path)
    kind = "directory" if is_dir else "file"
    if not (p.is_dir() if is_dir else p.is_file()):
        raise ConfigError(key, path, f"an existing {kind} (relative to {Path.cwd()})")
    return p


#: The most classes a file's labels may name (labels are class indices below it).
MAX_CLASSES = 100_000


def _labels(
    values: Any, key: str, value: Any, where: str, *, row: Callable[[int], str] | None = None
) -> np.ndarray:
    """Convert ``values`` to int64 labels or raise naming the first that is not a class index."""
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, value, f"integer class labels >= 0 in {where}") from None
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr >= MAX_CLASSES)
    if bad.any():
        first = int(np.argmax(bad))
        name = (row or "example {}".format)(first)
        raise ConfigError(
            key,
            value,
            f"integer class labels in [0, {MAX_CLASSES}) in {where}; "
            f"{name} has label {np.asarray(values).reshape(-1)[first]}",
        )
    return arr.astype(np.int64)


def _features(
    x: np.ndarray, key: str, value: Any, *, row: Callable[[int], str], column: Callable[[int], str]
) -> np.ndarray:
    """``x`` as float32, or raise naming the first entry that is not a finite real number.

    Values beyond float32's range (|x| > 3.4e38) become infinite and are refused
    too: they would turn the first forward pass into NaN.
    """
    if x.dtype.kind not in "biuf":
        raise ConfigError(key, value, f"real numeric features, not dtype {x.dtype}")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise ConfigError(key, value, f"at least one feature per example, got shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        c = int(np.ravel_multi_index(first[1:], x.shape[1:]))
        raise ConfigError(
            key,
            value,
            f"finite features within float32 range; {row(first[0])}, {column(c)} is {x[first]}",
        )
    return out


def _one_class_warning(y: np.ndarray, where: str) -> None:
    if len(y) > 1 and np.all(y == y[0]):
        warnings.warn(f"every training example of {where} has label {int(y[0])}", stacklevel=3)


def _ids(values: Any) -> np.ndarray:
    """Natural ids as int64 when they are all integers, else as strings."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError):
        return arr.astype(str)
    return num.astype(np.int64) if np.all(num == np.round(num)) else arr.astype(str)


def _task(
    task: str,
    path: str,
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    test: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
    *,
    label_key: str,
    test_fraction: float,
    seed: int,
    test_source: tuple[str, str] | None = None,
    num_classes: int | None = None,
) -> TaskData:
    """Assemble the arrays read from ``path`` (holding out a test set when none is given)."""
    x, y, ids = train
    test_key, test_path = test_source or ("data.path", path)
    if len(y) == 0 or (test is not None and len(test[1]) == 0):
        raise ConfigError(test_key if len(y) else "data.path", path, "at least one example")
    if test is not None and test[0].shape[1:] != x.shape[1:]:
        raise ConfigError(
            test_key, test_path, f"test features of shape {x.shape[1:]} like the training data"
        )
    found = max(int(y.max()), int(test[1].max()) if test is not None else 0) + 1
    classes = num_classes or found
    if found > classes:
        raise ConfigError(label_key, found - 1, f"labels below the {classes} classes of {path}")
    name = f"{task} data at {path}"
    _one_class_warning(y, name)
    data = Dataset(x, y, classes, ids, name=name)
    if test is None:
        train_ds, test_ds = holdout(data, test_fraction=test_fraction, seed=seed)
    else:
        train_ds, test_ds = data, Dataset(test[0], test[1], classes, test[2], name=name)
    return TaskData(task, train_ds, test_ds)


@dataclass(frozen=True)
class PathParams:
    """A loader that reads one local file or directory (``mnist``, ``cifar10``)."""

    path: str

    def __post_init__(self) -> None:
        check(bool(self.path), "path", self.path, "a non-empty file or directory path")


@dataclass(frozen=True)
class NpzParams(PathParams):
    """A ``.npz`` file with feature and label arrays (and optionally natural ids)."""

    x_key: str = "x"
    y_key: str = "y"
    test_path: str | None = None
    natural_id_key: str | None = None


def _read_npz(path: str, key: str, p: NpzParams, *, need_ids: bool) -> tuple:
    file = _existing(path, key)
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise ConfigError(key, path, f"a .npz archive written by numpy.savez ({err})") from None
    wanted = [("data.x_key", p.x_key), ("data.y_key", p.y_key)]
    if p.natural_id_key is not None and (need_ids or p.natural_id_key in arrays):
        wanted.append(("data.natural_id_key", p.natural_id_key))
    for name_key, array in wanted:
        if array not in arrays:
            raise ConfigError(name_key, array, f"an array of {path}: {', '.join(sorted(arrays))}")
    x, y = arrays[p.x_key], arrays[p.y_key]
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            key, path, f"x of shape (n, ...) and y of shape (n,), got {x.shape} and {y.shape}"
        )
    ids = _ids(arrays[p.natural_id_key]) if len(wanted) == 3 else None
    if ids is not None and ids.shape != y.shape:
        raise ConfigError("data.natural_id_key", p.natural_id_key, f"an array of shape {y.shape}")
    x = _features(
        x,
        "data.x_key",
        p.x_key,
        row=lambda r: f"example {r} of {path}",
        column=lambda c: f"flat feature {c}",
    )
    return x, _labels(y, "data.y_key", p.y_key, path), ids


def load_npz(params: NpzParams, *, test_fraction: float, seed: int) -> TaskData:
    """Arrays from a ``.npz`` file; the test set is ``test_path`` or a stratified holdout."""
    train = _read_npz(params.path, "data.path", params, need_ids=True)
    test = None
    if params.test_path is not None:
        test = _read_npz(params.test_path, "data.test_path", params, need_ids=False)
    return _task(
        "npz",
        params.path,
        train,
        test,
        label_key="data.y_key",
        test_fraction=test_fraction,
        seed=seed,
        test_source=("data.test_path", str(params.test_path)),
    )


@dataclass(frozen=True)
class CsvParams(PathParams):
    """A CSV file with a header row: one label column, the other columns float features."""

    label_column: str = "label"
    test_path: str | None = None
    natural_id_column: str | None = None


def _read_csv(path: str, key: str, p: CsvParams, features: list[str] | None) -> tuple:
    with _existing(path, key).open(newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2 or any(len(r) != len(rows[0]) for r in rows[1:]):
        raise ConfigError(key, path, "a CSV file: a header row, then rows of the same length")
    header, table = rows[0], np.array(rows[1:], dtype=str)
    id_col = p.natural_id_column
    if features is not None and id_col not in header:
        id_col = None  # a test file needs no natural ids
    for name_key, column in (
        ("data.label_column", p.label_column),
        ("data.natural_id_column", id_col),
    ):
        if column is not None and column not in header:
            raise ConfigError(name_key, column, f"a column of {path}: {', '.join(header)}")
    skip = {p.label_column, p.natural_id_column}
    features = features or [c for c in header if c not in skip]
    missing = [c for c in features if c not in header]
    if not features or missing:
        raise ConfigError(key, path, f"feature columns {features} besides the label column")
    cols = [header.index(c) for c in features]
    try:
        x = table[:, cols].astype(np.float64)
    except ValueError:
        bad = next(
            ((r, c) for r in range(len(table)) for c in cols if not _is_float(table[r, c])),
            (0, cols[0]),
        )
        raise ConfigError(
            key, path, f"numeric features; row {bad[0] + 2}, column '{header[bad[1]]}' is not"
        ) from None
    x = _features(
        x,
        key,
        path,
        row=lambda r: f"row {r + 2}",
        column=lambda c: f"column '{features[c]}'",
    )
    y = _labels(
        table[:, header.index(p.label_column)],
        "data.label_column",
        p.label_column,
        path,
        row=lambda r: f"row {r + 2}",
    )
    ids = None if id_col is None else _ids(table[:, header.index(id_col)])
    return x, y, ids, features


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv(params: CsvParams, *, test_fraction: float, seed: int) -> TaskData:
    """Rows of a CSV file; the test set is ``test_path`` (same columns) or a stratified holdout."""
    *train, features = _read_csv(params.path, "data.path", params, None)
    test = None
    if params.test_path is not None:
        test = tuple(_read_csv(params.test_path, "data.test_path", params, features)[:3])
    return _task(
        "csv",
        params.path,
        tuple(train),
        test,
        label_key="data.label_column",
        test_fraction=test_fraction,
        seed=seed,
        test_source=("data.test_path", str(params.test_path)),
    )


@dataclass(frozen=True)
class HfParams(PathParams):
    """A directory written by Hugging Face ``datasets`` ``save_to_disk``."""

    feature_column: str = "x"
    label_column: str = "label"
    natural_id_column: str | None = None


def _read_hf(ds: Any, p: HfParams, split: str) -> tuple:
    import datasets

    where = f"split '{split}' of {p.path}"
    wanted = [("data.feature_column", p.feature_column), ("data.label_column", p.label_column)]
    if p.natural_id_column is not None:
        wanted.append(("data.natural_id_column", p.natural_id_column))
    for key, column in wanted:
        if column not in ds.column_names:
            raise ConfigError(key, column, f"a column of {where}: {', '.join(ds.column_names)}")
    table = ds.with_format("numpy")
    image = isinstance(ds.features[p.feature_column], datasets.Image)
    try:
        x = np.asarray(table[p.feature_column][:], dtype=np.float32)
    except (TypeError, ValueError):
        x = np.empty(0, dtype=object)
    if x.ndim == 1 and not image:
        x = x[:, None]  # one number per example
    if x.dtype == object or x.ndim < (3 if image else 2):
        raise ConfigError(
            "data.feature_column",
            p.feature_column,
            f"numbers, lists or images of one shape in {where}",
        )
    if image:
        x = (x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)) / 255.0
    x = _features(
        x,
        "data.feature_column",
        p.feature_column,
        row=lambda r: f"example {r} of {where}",
        column=lambda c: f"flat feature {c}",
    )
    y = _labels(table[p.label_column][:], "data.label_column", p.label_column, where)
    ids = _ids(table[p.natural_id_column][:]) if p.natural_id_column is not None else None
    return x, y, ids


def load_hf(params: HfParams, *, test_fraction: float, seed: int) -> TaskData:
    """A saved ``Dataset`` or ``DatasetDict`` (``train``, optional ``test``, else a holdout)."""
    import datasets

    folder = _existing(params.path, is_dir=True)
    try:
        saved = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError("data.path", params.path, f"a save_to_disk directory ({err})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise ConfigError(
                "data.path", params.path, f"a DatasetDict with a 'train' split, not {list(saved)}"
            )
        train_ds, test_ds = saved["train"], saved.get("test")
    else:
        train_ds, test_ds = saved, None
    label = train_ds.features.get(params.label_column)
    classes = label.num_classes if isinstance(label, datasets.ClassLabel) else None
    train = _read_hf(train_ds, params, "train")
    test = _read_hf(test_ds, params, "test") if test_ds is not None else None
    return _task(
        "hf",
        params.path,
        train,
        test,
        label_key="data.label_column",
        test_fraction=test_fraction,
        seed=seed,
        num_classes=classes,
    )


DATASETS.register("npz", load_npz, params=NpzParams)
DATASETS.register("csv", load_csv, params=CsvParams)
DATASETS.register("hf", load_hf, params=HfParams)
