"""Hostile data and output paths: refused at load or before the engine, in one line naming it.

Non-finite or out-of-float32 features, non-numeric dtypes, labels that are not
class indices, empty or oversized scenario files and unusable ``--out``
directories each give a :class:`~fedopt.errors.ConfigError` naming the file,
row and column; a one-class training set warns. Random npz and CSV contents
(hypothesis, derandomized) load or raise a ConfigError, never another exception.
"""

from __future__ import annotations

import csv
import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedopt.config import MAX_TOML_BYTES, load_scenario
from fedopt.data.files import MAX_CLASSES, CsvParams, NpzParams, load_csv, load_npz
from fedopt.errors import ConfigError
from fedopt.simulation import make_run_dir

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _csv(path: Path, rows: list[list[object]], header=("a", "b", "label")) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(n: int = 30) -> list[list[object]]:
    return [[0.5 * i, -0.25 * i, i % 3] for i in range(n)]


@pytest.mark.parametrize(
    ("row", "col", "value", "shown"),
    [(4, 1, "nan", "nan"), (0, 0, "inf", "inf"), (7, 0, "-1e39", "-1e+39")],
)
def test_a_non_finite_csv_feature_is_named_by_row_and_column(tmp_path, row, col, value, shown):
    rows = _rows()
    rows[row][col] = value
    path = _csv(tmp_path / "d.csv", rows)
    with pytest.raises(ConfigError) as info:
        load_csv(CsvParams(path=str(path)), test_fraction=0.2, seed=0)
    assert info.value.key == "data.path"
    column = "ab"[col]
    assert f"finite features within float32 range; row {row + 2}, column '{column}' is {shown}" in (
        str(info.value)
    )


@pytest.mark.parametrize(
    ("label", "shown"),
    [
        (str(MAX_CLASSES), str(MAX_CLASSES)),
        ("99999999999999999999999", "99999999999999999999999"),
        ("-1", "-1"),
        ("1.5", "1.5"),
    ],
)
def test_a_csv_label_that_is_not_a_class_index_is_named_by_row(tmp_path, label, shown):
    rows = _rows()
    rows[9][2] = label
    path = _csv(tmp_path / "d.csv", rows)
    with pytest.raises(ConfigError) as info:
        load_csv(CsvParams(path=str(path)), test_fraction=0.2, seed=0)
    assert info.value.key == "data.label_column"
    assert f"integer class labels in [0, {MAX_CLASSES}) in {path}; row 11 has label {shown}" in (
        str(info.value)
    )


@pytest.mark.parametrize(
    ("x", "needs"),
    [
        (np.ones((20, 2), dtype=complex), "real numeric features, not dtype complex128"),
        (np.array([["a", "b"]] * 20), "real numeric features, not dtype <U1"),
        (
            np.where(np.arange(40).reshape(20, 2) == 13, np.inf, 1.0),
            "example 6 of {path}, flat feature 1 is inf",
        ),
    ],
)
def test_npz_features_must_be_finite_real_numbers(tmp_path, x, needs):
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(20) % 2)
    with pytest.raises(ConfigError) as info:
        load_npz(NpzParams(path=str(path)), test_fraction=0.2, seed=0)
    assert info.value.key == "data.x_key"
    assert needs.format(path=path) in str(info.value)


def test_a_one_class_training_set_warns_and_loads(tmp_path):
    path = _csv(tmp_path / "d.csv", [[float(i), 1.0, 2] for i in range(10)])
    with pytest.warns(UserWarning, match=r"every training example of csv data at .* has label 2"):
        data = load_csv(CsvParams(path=str(path)), test_fraction=0.2, seed=0)
    assert data.train.num_classes == 3 and set(data.train.y.tolist()) == {2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two classes: no warning
        load_csv(CsvParams(path=str(_csv(tmp_path / "e.csv", _rows()))), test_fraction=0.2, seed=0)


def test_an_empty_or_oversized_scenario_file_is_refused(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(empty)
    assert info.value.key == "scenario" and "it is empty" in str(info.value)
    big = tmp_path / "big.toml"
    big.write_text('name = "x"\n' + " " * MAX_TOML_BYTES)
    with pytest.raises(ConfigError) as info:
        load_scenario(big)
    assert f"a TOML file of at most {MAX_TOML_BYTES} bytes" in str(info.value)
    assert load_scenario(_small(tmp_path)).name == "x"


def _small(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text('name = "x"\n')
    return path


def test_out_paths_that_cannot_hold_a_run_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        make_run_dir(tmp_path / "file", "n")
    assert info.value.key == "--out" and "(Not a directory)" in str(info.value)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError) as info:
        make_run_dir(tmp_path / "ro", "n")
    assert "a directory fedopt can create and write (Read-only file system)" in str(info.value)


def test_two_runs_in_the_same_second_never_share_a_directory(tmp_path):
    made = {make_run_dir(tmp_path, "n") for _ in range(5)}
    assert len(made) == 5 and all(p.is_dir() for p in made)


_DTYPES = st.sampled_from(["float32", "float64", "int8", "int64", "uint8", "bool", "complex64"])
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


@FUZZ
@given(
    n=st.integers(0, 12),
    shape=st.lists(st.integers(0, 3), max_size=3),
    x_dtype=_DTYPES,
    y_dtype=_DTYPES,
    fill=_FLOATS,
    labels=st.lists(st.one_of(st.integers(-3, 2 * MAX_CLASSES), _FLOATS), min_size=1, max_size=4),
    y_len=st.integers(0, 12),
)
def test_random_npz_contents_load_or_raise_a_config_error(
    tmp_path, n, shape, x_dtype, y_dtype, fill, labels, y_len
):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = np.full((n, *shape), fill).astype(x_dtype)
        y = np.resize(np.array(labels, dtype=np.float64), y_len).astype(y_dtype)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_npz(NpzParams(path=str(path)), test_fraction=0.2, seed=0)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert np.isfinite(data.train.x).all() and data.train.x.dtype == np.float32
    assert data.train.y.min() >= 0 and data.train.y.max() < data.train.num_classes <= MAX_CLASSES


_CELL = st.one_of(
    st.text(alphabet='0123456789.-+eEinfa ,"x', max_size=6),
    _FLOATS.map(repr),
    st.integers(-5, 10**25).map(str),
)


@FUZZ
@given(rows=st.lists(st.lists(_CELL, min_size=1, max_size=4), max_size=10))
def test_random_csv_contents_load_or_raise_a_config_error(tmp_path, rows):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["a", "label"])
        writer.writerows(rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_csv(CsvParams(path=str(path)), test_fraction=0.2, seed=0)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert np.isfinite(data.train.x).all()
    assert data.train.y.min() >= 0 and data.train.y.max() < data.train.num_classes
