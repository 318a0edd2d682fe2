"""Message keys, byte accounting and array checks on Flower records.

Byte counts are the sizes of the records as Flower serialises them for the
wire (protobuf), summed per record so that an array record broadcast to many
clients is measured once per round, not serialised once per client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

__all__ = ["ByteCounter", "SelectedGrid", "cast_like", "non_finite_keys"]

#: Key of the ConfigRecord that names the virtual client a message is for.
CID_KEY = "cid"
#: Key of the ConfigRecord that names the run (sweeps drive several runs in one federation).
RUN_KEY = "run-key"


class ByteCounter:
    """Exact wire sizes of message contents, caching the size of each record object."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, int]] = {}
        self._by_layout: dict[tuple[Any, ...], int] = {}

    def record_size(self, key: str, record: Any) -> int:
        """Serialised size of one ``key: record`` entry of a RecordDict.

        Protobuf sizes depend on the lengths of the bytes fields, not on their
        contents, so array records with the same layout (keys, dtypes, shapes,
        data lengths) share one measured size: each client's model update is
        not serialised just to be counted.
        """
        hit = self._cache.get(id(record))
        if hit is not None and hit[0] is record:
            return hit[1]
        layout = None
        if isinstance(record, ArrayRecord):
            layout = (
                key,
                *((k, a.dtype, tuple(a.shape), a.stype, len(a.data)) for k, a in record.items()),
            )
            size = self._by_layout.get(layout)
            if size is not None:
                return size
        size = recorddict_to_proto(RecordDict({key: record})).ByteSize()
        if layout is not None:
            self._cache[id(record)] = (record, size)
            self._by_layout[layout] = size
        return size

    def content_size(self, content: RecordDict) -> int:
        """Serialised size of a whole RecordDict (equals the protobuf ByteSize)."""
        return sum(self.record_size(k, v) for k, v in content.items())

    def reply_size(self, msg: Message) -> int:
        """Size of a reply's content (0 for an error reply, which carries none)."""
        return 0 if msg.has_error() else self.content_size(msg.content)

    def clear(self) -> None:
        """Forget cached sizes (call once per round so old records can be freed)."""
        self._cache.clear()


class SelectedGrid:
    """A view of a Flower Grid that shows a strategy only the nodes fedopt selected.

    Flower strategies sample from ``grid.get_node_ids()``; with ``fraction = 1``
    they take every node they are shown, so the seeded selection made by
    fedopt's round loop (availability, clients per round) is exactly what the
    strategy configures, while its own configure/aggregate code runs unchanged.
    """

    def __init__(self, grid: Any, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        """The selected node ids only."""
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array in the dtype of the same key in ``reference``.

    Some of Flower's server optimizers (FedAdam, FedYogi, FedAdagrad) multiply by
    numpy float64 scalars and hand back float64 arrays; the global model keeps
    the model's own dtypes so that it does not silently double in size on the wire.
    """
    if all(arrays[k].dtype == reference[k].dtype for k in arrays.keys() if k in reference):
        return arrays
    out = ArrayRecord()
    for key, array in arrays.items():
        values = array.numpy()
        if key in reference and str(values.dtype) != reference[key].dtype:
            values = values.astype(np.dtype(reference[key].dtype))
        out[key] = Array(values)
    return out


def non_finite_keys(arrays: ArrayRecord) -> list[str]:
    """Keys of arrays that hold NaN or inf."""
    bad = []
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad.append(key)
    return bad


def sorted_by_cid(pairs: Iterable[tuple[int, Message]]) -> list[tuple[int, Message]]:
    """Replies ordered by client id, so aggregation sums in the same order every run."""
    return sorted(pairs, key=lambda p: p[0])
