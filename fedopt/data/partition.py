"""Partitioners that split a training set among clients, built on flwr-datasets' partitioners."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedopt.data.core import Dataset, seed32
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import PARTITIONERS, NoParams

__all__ = [
    "DirichletParams",
    "PathologicalParams",
    "QuantityParams",
    "ShardsParams",
    "lognormal_sizes",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "partition_pathological",
    "partition_quantity",
    "partition_shards",
]


def _run(
    train: Dataset, make: Callable[[], Any], num_clients: int, *, order: np.ndarray | None = None
) -> list[np.ndarray]:
    """Hand ``train``'s labels (and ids) to the flwr-datasets partitioner ``make()``.

    ``order`` permutes the rows first (for partitioners that cut contiguous slices).
    Returns each partition's indices into ``train``; flwr-datasets' ``ValueError``
    propagates, its warnings and progress output are silenced.
    """
    import datasets

    index = np.arange(len(train), dtype=np.int64)
    columns: dict[str, Any] = {"label": train.labels, "index": index}
    if train.natural_id is not None:
        columns["natural_id"] = train.natural_id
    table = datasets.Dataset.from_dict(columns)
    if order is not None:
        table = table.select(order)
    partitioner = make()
    partitioner.dataset = table
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return [
            np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(num_clients)
        ]


def partition_iid(
    train: Dataset, params: NoParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_clients`` near-equal parts (``IidPartitioner``)."""
    from flwr_datasets.partitioner import IidPartitioner

    order = np.random.default_rng(seed32(seed)).permutation(len(train))
    return _run(train, lambda: IidPartitioner(num_partitions=num_clients), num_clients, order=order)


@dataclass(frozen=True)
class DirichletParams:
    """Label skew: each class is split among clients by Dirichlet(alpha) proportions.

    Attributes
    ----------
    alpha : float
        Concentration; small values give few classes per client.
    min_partition_size : int
        Redraw until every client has at least this many examples.
    self_balancing : bool
        Stop giving examples to clients already above the average size.
    """

    alpha: float = 0.5
    min_partition_size: int = 2
    self_balancing: bool = False

    def __post_init__(self) -> None:
        check(self.alpha > 0, "alpha", self.alpha, "a number > 0")
        check(
            self.min_partition_size >= 0,
            "min_partition_size",
            self.min_partition_size,
            "an integer >= 0",
        )


def partition_dirichlet(
    train: Dataset, params: DirichletParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Dirichlet label skew (``DirichletPartitioner``)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    def make() -> Any:
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(params.alpha),
            min_partition_size=params.min_partition_size,
            self_balancing=params.self_balancing,
            shuffle=True,
            seed=seed32(seed),
        )

    try:
        return _run(train, make, num_clients)
    except ValueError:
        raise ConfigError(
            "partition.min_partition_size",
            params.min_partition_size,
            f"a size that Dirichlet(alpha={params.alpha}) reaches for all {num_clients} clients "
            f"within 10 draws: lower partition.min_partition_size, raise partition.alpha "
            "or use fewer clients",
        ) from None


@dataclass(frozen=True)
class PathologicalParams:
    """Each client holds examples of only ``classes_per_client`` classes."""

    classes_per_client: int = 2
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = (
        "first-deterministic"
    )

    def __post_init__(self) -> None:
        check(
            self.classes_per_client >= 1,
            "classes_per_client",
            self.classes_per_client,
            "an integer >= 1",
        )


def partition_pathological(
    train: Dataset, params: PathologicalParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Pathological label skew (``PathologicalPartitioner``)."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    present = len(np.unique(train.labels))
    if not 1 <= params.classes_per_client <= present:
        raise ConfigError(
            "partition.classes_per_client",
            params.classes_per_client,
            f"between 1 and the {present} classes present in the training data",
        )

    def make() -> Any:
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=params.classes_per_client,
            class_assignment_mode=params.class_assignment_mode,
            seed=seed32(seed),
        )

    try:
        return _run(train, make, num_clients)
    except ValueError as err:
        raise ConfigError(
            "partition.classes_per_client",
            params.classes_per_client,
            f"a setting every class can serve ({err}); use fewer clients or classes per client",
        ) from None


@dataclass(frozen=True)
class ShardsParams:
    """Sort by label, cut into shards, deal ``shards_per_client`` shards to each client."""

    shards_per_client: int = 2
    shard_size: int | None = None

    def __post_init__(self) -> None:
        check(
            self.shards_per_client >= 1,
            "shards_per_client",
            self.shards_per_client,
            "an integer >= 1",
        )
        check(
            self.shard_size is None or self.shard_size >= 1,
            "shard_size",
            self.shard_size,
            "an integer >= 1, or omitted for len(train) / (clients * shards_per_client)",
        )


def partition_shards(
    train: Dataset, params: ShardsParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Label-sorted shards, as in FedAvg's pathological non-IID split (``ShardPartitioner``)."""
    from flwr_datasets.partitioner import ShardPartitioner

    def make() -> Any:
        return ShardPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_shards_per_partition=params.shards_per_client,
            shard_size=params.shard_size,
            seed=seed32(seed),
        )

    try:
        return _run(train, make, num_clients)
    except (ValueError, ZeroDivisionError):  # shard size 0 when shards outnumber examples
        need = num_clients * params.shards_per_client
        raise ConfigError(
            "partition.shards_per_client",
            params.shards_per_client,
            f"{num_clients} clients x shards_per_client shards of partition.shard_size "
            f"({params.shard_size}) that fit in the {len(train)} examples (now {need} shards)",
        ) from None


@dataclass(frozen=True)
class QuantityParams:
    """Quantity skew: client sizes follow ``distribution``; labels IID within a client."""

    distribution: Literal["lognormal", "linear", "square", "exponential"] = "lognormal"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        check(self.sigma >= 0, "sigma", self.sigma, "a number >= 0")


def lognormal_sizes(total: int, *, num_clients: int, sigma: float, seed: int) -> list[int]:
    """Integer sizes >= 1 summing to ``total``, proportional to lognormal(0, sigma) draws.

    Every client gets 1, the rest is shared in proportion to the draws, and the
    rounding remainder goes to the largest fractional parts (ties to the lower client).
    """
    weights = np.random.default_rng([seed32(seed), 1]).lognormal(0.0, sigma, num_clients)
    share = (total - num_clients) * weights / weights.sum()
    sizes = np.floor(share).astype(np.int64)
    left = total - num_clients - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:left]] += 1
    return [int(s) + 1 for s in sizes]


def partition_quantity(
    train: Dataset, params: QuantityParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Quantity skew via ``SizePartitioner`` or Linear/Square/Exponential partitioners."""
    from flwr_datasets import partitioner as fp

    n = len(train)
    makers: dict[str, Callable[[], Any]] = {
        "lognormal": lambda: fp.SizePartitioner(
            partition_sizes=lognormal_sizes(
                n, num_clients=num_clients, sigma=params.sigma, seed=seed
            )
        ),
        "linear": lambda: fp.LinearPartitioner(num_partitions=num_clients),
        "square": lambda: fp.SquarePartitioner(num_partitions=num_clients),
        "exponential": lambda: fp.ExponentialPartitioner(num_partitions=num_clients),
    }
    order = np.random.default_rng(seed32(seed)).permutation(n)
    try:
        return _run(train, makers[params.distribution], num_clients, order=order)
    except ValueError:
        raise ConfigError(
            "partition.num_clients",
            num_clients,
            f"few enough clients that the smallest '{params.distribution}' share of the "
            f"{n} examples is at least 1 (use fewer clients or another distribution)",
        ) from None


def partition_natural(
    train: Dataset, params: NoParams, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """One client per distinct natural id, in sorted id order (``NaturalIdPartitioner``)."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if train.natural_id is None:
        raise ConfigError(
            "partition.name",
            "natural",
            "a dataset that carries a natural client id (synthetic, or data.natural_id_* set); "
            f"{train.name or 'this dataset'} has none",
        )
    distinct = len(np.unique(train.natural_id))
    if num_clients != distinct:
        raise ConfigError(
            "partition.num_clients",
            num_clients,
            f"exactly the {distinct} natural ids of {train.name or 'the dataset'}",
        )
    return _run(train, lambda: NaturalIdPartitioner(partition_by="natural_id"), num_clients)


PARTITIONERS.register("iid", partition_iid, params=NoParams)
PARTITIONERS.register("dirichlet", partition_dirichlet, params=DirichletParams)
PARTITIONERS.register("pathological", partition_pathological, params=PathologicalParams)
PARTITIONERS.register("shards", partition_shards, params=ShardsParams)
PARTITIONERS.register("quantity", partition_quantity, params=QuantityParams)
PARTITIONERS.register("natural", partition_natural, params=NoParams)
