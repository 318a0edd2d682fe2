"""fedopt's .npy fast path writes and reads exactly what Flower's Array does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedopt import codec

codec.install()
FLOWER_ENCODE = codec._original["encode"]
FLOWER_DECODE = codec._original["decode"]

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.full((), 3.5),
    np.arange(7, dtype=np.int64),
    np.array([True, False]),
    np.zeros((0, 5), dtype=np.float16),
    np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, 1],  # not contiguous
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),  # Fortran order
    np.arange(6, dtype=">i4"),  # big-endian
    np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # structured: Flower's path
    np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32),
]


@pytest.mark.parametrize("nd", CASES, ids=range(len(CASES)))
def test_bytes_and_arrays_match_flower(nd):
    ours, theirs = codec.encode(nd), FLOWER_ENCODE(nd)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        theirs.dtype,
        theirs.shape,
        theirs.stype,
        theirs.data,
    )
    back, ref = codec.decode(theirs), FLOWER_DECODE(theirs)
    assert back.dtype == ref.dtype and back.shape == ref.shape
    np.testing.assert_array_equal(back, ref)
    assert back.flags.writeable


def test_installed_methods_are_used_by_records():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = Array(t)
    assert a.data == FLOWER_ENCODE(t.numpy()).data
    out = a.numpy()
    out[0, 0] = 7.0  # writable, and the bytes are untouched
    np.testing.assert_array_equal(FLOWER_DECODE(a), t.numpy())


def test_a_foreign_header_goes_through_flowers_reader():
    nd = np.arange(4, dtype=np.float32)
    a = FLOWER_ENCODE(nd)
    odd = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-4])  # torn data
    with pytest.raises(ValueError):
        odd.numpy()


def test_a_shared_record_is_decoded_once_and_an_edited_one_again():
    from flwr.app import ArrayRecord

    record = ArrayRecord([np.zeros(3, dtype=np.float32)])
    first = codec.torch_state(record)
    assert codec.torch_state(record) is first  # a pack's clients share one decode
    record["0"] = Array(np.ones(3, dtype=np.float32))
    assert codec.torch_state(record)["0"].tolist() == [1.0, 1.0, 1.0]
