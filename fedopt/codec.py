"""Byte-identical, faster ``.npy`` encoding and decoding of Flower's ``Array``.

Flower stores every array of an ArrayRecord as ``.npy`` bytes: ``np.save``
to build them and ``np.load`` to read them back, which parses the header
text with ``ast`` for every array (about 20 µs each, more than the copy of a
small layer). A simulation moves thousands of such arrays per round, so
fedopt writes and reads the very same bytes with a header computed once
per (dtype, shape): ``data = header + raw bytes`` on the way out,
``np.frombuffer`` after checking the header on the way in. Anything the fast
path does not cover (Fortran order, object dtypes, a foreign header) goes
through Flower's own code, and the results are identical either way
(``tests/test_codec.py`` checks bytes and arrays against Flower's).

:func:`install` swaps the two methods of Flower's ``Array`` in the calling
process; fedopt's server and client runtimes call it.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["decode", "encode", "install", "torch_state", "view"]

_NUMPY_STYPE = "numpy.ndarray"
_original: dict[str, Any] = {}


@functools.lru_cache(maxsize=4096)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer,
        {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": shape},
    )  # fmt: skip
    return buffer.getvalue()


def _fast(dtype: np.dtype) -> bool:
    return not dtype.hasobject and dtype.fields is None and dtype.subdtype is None


def encode(ndarray: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray``: the same bytes, without re-deriving the header."""
    if not isinstance(ndarray, np.ndarray) or not _fast(ndarray.dtype):
        return _original["encode"](ndarray)
    if not ndarray.flags.c_contiguous and ndarray.flags.f_contiguous and ndarray.ndim > 1:
        return _original["encode"](ndarray)  # np.save writes Fortran order for these
    shape = tuple(int(d) for d in ndarray.shape)
    head = _header(ndarray.dtype.str, shape)
    data = head + np.ascontiguousarray(ndarray).tobytes()
    # What Array's own constructor ends up with, without its argument checks (~50 µs)
    out = Array.__new__(Array)
    out.__dict__.update(dtype=str(ndarray.dtype), shape=shape, stype=_NUMPY_STYPE, data=data)
    return out


class _LastState:
    """One-slot cache: the tensors of the last ArrayRecord decoded (a pack's shared model)."""

    def __init__(self) -> None:
        self.record: Any = None
        self.data: tuple[bytes, ...] = ()
        self.state: dict[str, torch.Tensor] = {}

    def get(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        data = tuple(a.data for a in record.values())  # a record edited in place is new
        same = record is self.record and len(data) == len(self.data)
        if not (same and all(a is b for a, b in zip(data, self.data, strict=True))):
            self.state = record.to_torch_state_dict()
            self.record, self.data = record, data
        return self.state


_LAST = _LastState()


def torch_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, decoded once when several clients load the same record.

    The tensors are shared between callers: copy them (``load_weights_``), never write to them.
    """
    return _LAST.get(record)


def decode(array: Array) -> np.ndarray:
    """``Array.numpy``: a writable array read straight from the bytes when the header is known."""
    out = _fast_view(array)
    return _original["decode"](array) if out is None else out.copy()


def view(array: Array) -> np.ndarray:
    """A read-only array over ``array``'s bytes (no copy when the header is known)."""
    out = _fast_view(array)
    return array.numpy() if out is None else out


def _fast_view(array: Array) -> np.ndarray | None:
    """The array over the bytes of a ``.npy`` Array whose header is the one ``encode`` writes."""
    if array.stype == _NUMPY_STYPE:
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            dtype = None
        if dtype is not None and _fast(dtype):
            shape = tuple(int(d) for d in array.shape)
            head = _header(dtype.str, shape)
            data = array.data
            if data[: len(head)] == head and len(data) == len(head) + dtype.itemsize * int(
                np.prod(shape, dtype=np.int64)
            ):
                return np.frombuffer(data, dtype=dtype, offset=len(head)).reshape(shape)
    return None


def _numpy(self: Array) -> np.ndarray:
    return decode(self)


def install() -> None:
    """Use :func:`encode` / :func:`decode` for every Flower Array in this process."""
    if _original:
        return
    _original["encode"] = Array.from_numpy_ndarray
    _original["decode"] = Array.numpy
    Array.numpy = _numpy  # type: ignore[method-assign]
    Array.from_numpy_ndarray = classmethod(lambda cls, ndarray: encode(ndarray))  # type: ignore[method-assign, assignment]
