"""Partial weighted sums of client models: what a pack sends for a linear strategy, and their mean.

A strategy whose aggregation is an example-weighted mean of the client
models followed by a server step (FedAvg, FedProx, FedAvgM, FedAdam,
FedYogi, FedAdagrad) does not need every client's model, only their
weighted sum. With ``run.partial_sums`` (the default) the clients are split
into ``run.sum_groups`` fixed *sum groups* (``cid % sum_groups``); a pack
node adds the models of each group it hosts (:func:`group_sums`) and sends
those sums instead of one model per client, and the server adds the groups
(:func:`mean_reply`) and hands the strategy one reply carrying the mean,
which its own ``aggregate_train`` turns into the next global model.

The reduction is canonical, so results do not depend on how the clients are
spread over nodes and Ray workers: within a group the products
``num_examples * model`` are added in float64 in client-id order, the
groups are added in group order, and the mean (total / total examples) is
rounded once to the model's dtype. An unpacked run (``run.pack = "off"``)
reduces the per-client replies on the server with the same function, so
packed and unpacked runs stay bitwise identical. Against Flower's own
aggregation (``run.partial_sums = false``: every model to the server,
``sum_i x_i * (n_i / n)`` accumulated in float32) the mean differs by float
rounding only: at most one float32 rounding of the exact mean here, and
about one rounding per client there.

Per-client facts survive the reduction: each client's metrics travel beside
the sums, and each client's reply size as the unpacked protocol would have
sent it (:data:`REPLY_BYTES_KEY`), so ``bytes_up`` and ``per_client`` rows
are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedopt import codec
from fedopt.records import ByteCounter

__all__ = [
    "LINEAR_STRATEGIES",
    "LINEAR_WRAPPERS",
    "PARTIAL_KEY",
    "REPLY_BYTES_KEY",
    "GroupSum",
    "aggregate",
    "group_sums",
    "is_linear",
    "is_plain",
    "mean_reply",
    "reduced_content",
    "register_linear",
    "register_linear_wrapper",
    "split_reduced",
    "weighted_metrics",
]

#: ConfigRecord of a reduced pack reply: ``cids``, ``groups``, ``weights``, ``bytes``.
PARTIAL_KEY = "fedopt-partial"
#: ConfigRecord of a per-client reply rebuilt from a reduced pack: ``bytes`` it would have had.
REPLY_BYTES_KEY = "fedopt-reply-bytes"
#: The metric every client reply carries and every linear strategy weights by.
WEIGHT_KEY = "num-examples"

#: Strategy classes whose ``aggregate_train`` is the weighted mean of the replies, then a step.
#: Matched by exact type: a subclass may aggregate differently and must register itself.
LINEAR_STRATEGIES: set[type] = {FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad}

_SIZES = ByteCounter()


def register_linear(cls: type) -> type:
    """Declare that ``cls.aggregate_train`` only needs the example-weighted mean (a decorator).

    The class must weight by ``"num-examples"`` and give, for one reply
    carrying the mean, the result it gives for the replies themselves.
    """
    LINEAR_STRATEGIES.add(cls)
    return cls


#: Wrapper classes (a ``strategy`` attribute) whose ``aggregate_train`` hands the replies to
#: the wrapped strategy untouched and only adds to its result: linear when the wrapped one is.
LINEAR_WRAPPERS: set[type] = set()


def register_linear_wrapper(cls: type) -> type:
    """Declare that wrapper ``cls`` aggregates linearly whenever its inner strategy does."""
    LINEAR_WRAPPERS.add(cls)
    return cls


def is_linear(strategy: object) -> bool:
    """Whether ``strategy`` can aggregate from partial sums (declared by exact type)."""
    if type(strategy) in LINEAR_WRAPPERS:
        return is_linear(strategy.strategy)  # type: ignore[attr-defined]
    return type(strategy) in LINEAR_STRATEGIES and getattr(strategy, "weighted_by_key", None) == (
        WEIGHT_KEY
    )


def is_plain(content: RecordDict) -> bool:
    """Whether a client's reply is just a model and its metrics (what partial sums can carry)."""
    return set(content.keys()) == {"arrays", "metrics"}


@dataclass(frozen=True)
class GroupSum:
    """The float64 sum of ``num_examples * model`` over one sum group's replies."""

    weight: int
    sums: dict[str, np.ndarray]


def group_of(cid: int, *, groups: int) -> int:
    """The sum group of client ``cid``."""
    return cid % groups


def group_sums(replies: Mapping[int, RecordDict], *, groups: int) -> dict[int, GroupSum]:
    """Per sum group, the float64 sum of its clients' weighted models, added in client-id order."""
    weights: dict[int, int] = {}
    sums: dict[int, dict[str, np.ndarray]] = {}
    for cid in sorted(replies):
        content = replies[cid]
        weight = int(content["metrics"][WEIGHT_KEY])
        g = group_of(cid, groups=groups)
        weights[g] = weights.get(g, 0) + weight
        acc = sums.setdefault(g, {})
        for key, array in content["arrays"].items():
            term = codec.view(array).astype(np.float64) * weight
            if key in acc:
                acc[key] += term
            else:
                acc[key] = term
    return {g: GroupSum(weights[g], sums[g]) for g in weights}


def reduced_content(replies: Mapping[int, RecordDict], *, groups: int) -> RecordDict:
    """A pack's reply with its clients' models summed per group (metrics and sizes kept)."""
    sums = group_sums(replies, groups=groups)
    cids = sorted(replies)
    out = RecordDict()
    for g, acc in sums.items():
        out[f"g{g}"] = ArrayRecord({k: Array(v) for k, v in acc.sums.items()})
    for cid in cids:
        out[f"m{cid}"] = replies[cid]["metrics"]
    _SIZES.clear()
    out[PARTIAL_KEY] = ConfigRecord(
        {
            "cids": cids,
            "groups": list(sums),
            "weights": [acc.weight for acc in sums.values()],
            "bytes": [_SIZES.content_size(replies[c]) for c in cids],
        }
    )
    return out


def is_reduced(content: RecordDict) -> bool:
    """Whether a pack's reply carries partial sums."""
    return PARTIAL_KEY in content


def split_reduced(content: RecordDict) -> tuple[dict[int, RecordDict], dict[int, GroupSum]]:
    """A reduced pack reply's per-client contents (metrics and size) and its group sums."""
    index = content[PARTIAL_KEY]
    per_client = {
        int(cid): RecordDict(
            {"metrics": content[f"m{cid}"], REPLY_BYTES_KEY: ConfigRecord({"bytes": int(size)})}
        )
        for cid, size in zip(index["cids"], index["bytes"], strict=True)
    }
    sums = {
        int(g): GroupSum(int(w), {k: a.numpy() for k, a in content[f"g{g}"].items()})
        for g, w in zip(index["groups"], index["weights"], strict=True)
    }
    return per_client, sums


def reported_size(content: RecordDict) -> int | None:
    """The size a reduced client's reply would have had unpacked (None for a full reply)."""
    record = content.get(REPLY_BYTES_KEY)
    return None if record is None else int(record["bytes"])


def weighted_metrics(records: Sequence[MetricRecord], *, key: str = WEIGHT_KEY) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` of the replies' metrics, with the same arithmetic.

    Each metric (``key`` excluded) is ``sum_i value_i * (w_i / sum w)``, accumulated
    in reply order in Python floats exactly as Flower does, so the result is
    bitwise Flower's; only its per-entry record validation is skipped (one
    MetricRecord is built at the end).
    """
    weights = [record[key] for record in records]
    total = sum(weights)
    out: dict[str, Any] = {}
    for record, w in zip(records, weights, strict=True):
        factor = w / total
        for name, value in record.items():
            if name == key:
                continue
            if name not in out:
                out[name] = (
                    [v * factor for v in value] if isinstance(value, list) else value * factor
                )
            elif isinstance(value, list):
                out[name] = [c + v * factor for c, v in zip(out[name], value, strict=True)]
            else:
                out[name] = out[name] + value * factor
    return MetricRecord(out)


def mean_reply(
    sums: Iterable[tuple[int, GroupSum]],
    metrics: MetricRecord,
    *,
    like: ArrayRecord,
    reply_to: Message,
) -> Message:
    """One reply carrying the weighted mean of every group's sum and the aggregated metrics.

    ``sums`` are added in group order; the mean is rounded once to the dtype
    ``like`` has for each key. ``metrics`` are the strategy's own aggregate of
    the per-client metrics; the reply's weight is the total number of examples,
    so a linear strategy's mean over this single reply is the mean itself.
    """
    total: dict[str, np.ndarray] = {}
    weight = 0
    for _, acc in sorted(sums, key=lambda p: p[0]):
        weight += acc.weight
        for key, value in acc.sums.items():
            if key in total:
                total[key] = total[key] + value
            else:
                total[key] = value.astype(np.float64, copy=True)
    if weight <= 0:
        raise ValueError(f"the replying clients trained on {weight} examples in all")
    arrays = ArrayRecord(
        {
            k: Array(np.asarray(v / weight).astype(like[k].dtype if k in like else np.float32))
            for k, v in total.items()
        }
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({**dict(metrics), WEIGHT_KEY: weight})}
    )
    return Message(content, reply_to=reply_to)


def aggregate(
    strategy: Any,
    server_round: int,
    replies: Sequence[tuple[int, Message]],
    sums: Mapping[int, GroupSum],
    *,
    groups: int,
    like: ArrayRecord,
    instruction: Message,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """A linear strategy's ``aggregate_train`` over a round's group sums and full replies.

    ``replies`` are every replying client's, in client-id order: metrics only
    for those whose model is in one of the packs' ``sums``, whole for the
    others (unpacked, or alone on their node), which are summed here with the
    same function the packs use, so the result does not depend on the
    layout. When no pack was reduced and a reply is more than a model and
    metrics, the strategy gets the replies as they are.

    Raises
    ------
    ValueError
        A group summed twice, sums mixed with replies that cannot be summed,
        or no examples at all.
    """
    full = {cid: r.content for cid, r in replies if "arrays" in r.content}
    if not all(is_plain(c) for c in full.values()):
        if sums:
            raise ValueError("replies mix partial sums and records that cannot be summed")
        return strategy.aggregate_train(server_round, [r for _, r in replies])
    own = group_sums(full, groups=groups)
    if overlap := set(own) & set(sums):
        raise ValueError(f"sum groups {sorted(overlap)} arrived twice")
    key = strategy.weighted_by_key
    if strategy.train_metrics_aggr_fn is aggregate_metricrecords:
        metrics = weighted_metrics([r.content["metrics"] for _, r in replies], key=key)
    else:
        per_client = [RecordDict({"metrics": r.content["metrics"]}) for _, r in replies]
        metrics = strategy.train_metrics_aggr_fn(per_client, key)
    mean = mean_reply([*sums.items(), *own.items()], metrics, like=like, reply_to=instruction)
    return strategy.aggregate_train(server_round, [mean])
