"""Loaders for image datasets in their distribution formats: MNIST idx files, CIFAR-10 pickles."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from fedopt.data.core import TaskData
from fedopt.data.files import PathParams, _existing, _labels, _task
from fedopt.errors import ConfigError
from fedopt.registry import DATASETS

__all__ = ["load_cifar10", "load_mnist", "read_idx"]

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(file: Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` allowed): magic ``00 00 type ndim``, big-endian dims, data.

    Raises
    ------
    ConfigError
        ``data.path`` when the bytes are not a complete IDX file.
    """
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError) as err:
        raise ConfigError("data.path", str(file), f"a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ConfigError("data.path", str(file), "an IDX file (magic 0x00 0x00 type ndim)")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    dims = (
        tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
        if len(raw) >= 4 + 4 * ndim
        else None
    )
    size = int(np.prod(dims)) * dtype.itemsize if dims else -1
    if dims is None or ndim == 0 or len(raw) != 4 + 4 * ndim + size:
        raise ConfigError("data.path", str(file), f"an IDX file whose size matches dims {dims}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(params: PathParams, *, test_fraction: float, seed: int) -> TaskData:
    """MNIST-format idx files: images scaled to [0, 1] as (n, 1, rows, cols); test = t10k."""
    folder = _existing(params.path, is_dir=True)
    arrays = []
    for stem in _MNIST_FILES:
        file = next((f for f in (folder / stem, folder / f"{stem}.gz") if f.is_file()), None)
        if file is None:
            raise ConfigError(
                "data.path",
                params.path,
                f"a directory with {', '.join(_MNIST_FILES)} (or .gz); {stem} is missing",
            )
        arrays.append((file, read_idx(file)))
    sets = []
    for (img_file, img), (lab_file, lab) in (arrays[:2], arrays[2:]):
        if img.ndim != 3 or img.dtype != np.uint8 or lab.ndim != 1 or len(img) != len(lab):
            raise ConfigError(
                "data.path",
                params.path,
                f"uint8 images (n, rows, cols) in {img_file.name} and n labels in {lab_file.name}",
            )
        x = (img.astype(np.float32) / 255.0)[:, None, :, :]
        sets.append((x, _labels(lab, "data.path", params.path, lab_file.name), None))
    return _task(
        "mnist",
        params.path,
        sets[0],
        sets[1],
        label_key="data.path",
        test_fraction=test_fraction,
        seed=seed,
    )


def _read_cifar_batch(file: Path, path: str) -> tuple[np.ndarray, np.ndarray, None]:
    try:
        with file.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
        labels = batch.get(b"labels", batch.get("labels"))
    except (OSError, pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError):
        data, labels = np.empty(0), None
    if data.ndim != 2 or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise ConfigError(
            "data.path",
            path,
            f"{file.name} as a pickled dict with b'data' (N x 3072) and b'labels'",
        )
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return x, _labels(labels, "data.path", path, file.name), None


def load_cifar10(params: PathParams, *, test_fraction: float, seed: int) -> TaskData:
    """CIFAR-10 python batches: x (n, 3, 32, 32) in [0, 1]; present data batches; test_batch."""
    folder = _existing(params.path, is_dir=True)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = [
        folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()
    ]
    if not files or not (folder / "test_batch").is_file():
        raise ConfigError(
            "data.path",
            params.path,
            "a cifar-10-batches-py directory (or its parent) with "
            "at least one of data_batch_1..5 and test_batch",
        )
    parts = [_read_cifar_batch(f, params.path) for f in files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), None)
    test = _read_cifar_batch(folder / "test_batch", params.path)
    return _task(
        "cifar10",
        params.path,
        train,
        test,
        label_key="data.path",
        test_fraction=test_fraction,
        seed=seed,
        num_classes=10,
    )


DATASETS.register("mnist", load_mnist, params=PathParams)
DATASETS.register("cifar10", load_cifar10, params=PathParams)
