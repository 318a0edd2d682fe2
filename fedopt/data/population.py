"""Populations generated client by client from (seed, cid), and the ``lazy_synthetic`` dataset.

A pooled dataset is loaded whole and cut into index arrays, so its cost grows
with the number of clients. A *population* instead describes its clients: a
:class:`ClientPool` generates client ``cid``'s examples from ``(seed, cid)``
alone when asked, and its sizes without generating any example. A task over
a pool of 100,000 clients costs its central test set and the clients a round
touches, never the population.

``lazy_synthetic`` is Synthetic(alpha, beta) (:mod:`fedopt.data.builtin`) drawn
this way: user ``k`` has ``n_k = min(lognormal(4, 2) + 50, max_samples_per_user)``
examples, ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)`` with ``u_k ~ N(0, alpha^2)``,
features ``x ~ N(v_k, diag(j^-1.2))`` with ``v_k[j] ~ N(B_k, 1)``,
``B_k ~ N(0, beta^2)``, and labels ``argmax(W_k^T x + b_k)``; ``iid`` shares one
``W, b`` (seeded by ``(seed, 2)``) and ``v = 0``. The sizes of users
``4096 b .. 4096 b + 4095`` come from one generator seeded by
``(seed, stream, 0, b)``; user ``k``'s model and feature mean always come from
one seeded by ``(seed, 0, 1, k)``, its client examples from the same
generator after them (stream 0), and its held-out examples from one seeded by
``(seed, 1, 1, k)`` (stream 1). The central test set is the held-out examples
of users ``0 .. test_users - 1``, as the pooled ``synthetic`` holds out
examples of its own users; it does not depend on the population size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedopt.data.builtin import check_synthetic_knobs
from fedopt.data.core import Dataset, TaskData, seed32
from fedopt.params import check
from fedopt.registry import DATASETS

__all__ = [
    "SIZE_BLOCK",
    "ClientPool",
    "LazySyntheticParams",
    "SyntheticUsers",
    "load_lazy_synthetic",
]

#: Users whose sizes one generator draws (a size costs at most one block of draws).
SIZE_BLOCK = 4096


class ClientPool(Protocol):
    """What a population dataset hands the task: clients generated on demand."""

    def client(self, cid: int) -> Dataset:
        """All examples of client ``cid`` (before its train/test split)."""

    def sizes(self, cids: np.ndarray) -> np.ndarray:
        """Number of examples of each client in ``cids``, without generating any example."""


@dataclass(frozen=True)
class LazySyntheticParams:
    """Parameters of ``lazy_synthetic``: Synthetic(alpha, beta) generated one user at a time.

    Attributes
    ----------
    alpha : float
        Standard deviation of each user's model mean ``u_k`` (model, hence label, heterogeneity).
    beta : float
        Standard deviation of each user's feature-mean centre ``B_k`` (feature heterogeneity).
    dim : int
        Number of features.
    num_classes : int
        Number of classes.
    max_samples_per_user : int
        Cap on the lognormal(4, 2) + 50 examples of each user.
    iid : bool
        Share one model and one (zero) feature mean among all users.
    test_users : int
        Users ``0 .. test_users - 1`` whose held-out examples form the central test set.
    """

    alpha: float = 1.0
    beta: float = 1.0
    dim: int = 60
    num_classes: int = 10
    max_samples_per_user: int = 1000
    iid: bool = False
    test_users: int = 50

    def __post_init__(self) -> None:
        check_synthetic_knobs(self)
        check(self.test_users >= 1, "test_users", self.test_users, "an integer >= 1")


@dataclass(frozen=True)
class SyntheticUsers:
    """The users of one ``lazy_synthetic`` task: any user's examples from (seed, stream, k).

    Attributes
    ----------
    params : LazySyntheticParams
        The dataset's parameters.
    seed : int
        The run seed.
    stream : int
        0: the users' client examples; 1: their held-out examples (the central test set).
    """

    params: LazySyntheticParams
    seed: int
    stream: int = 0

    def _rng(self, stream: int, *parts: int) -> np.random.Generator:
        return np.random.default_rng([seed32(self.seed), stream, *parts])

    def sizes(self, cids: np.ndarray) -> np.ndarray:
        """int64 example counts of users ``cids``: one generator per block of 4096 users."""
        cids = np.asarray(cids, dtype=np.int64).reshape(-1)
        out = np.empty(len(cids), dtype=np.int64)
        blocks = cids // SIZE_BLOCK
        for block in np.unique(blocks):
            rng = self._rng(self.stream, 0, int(block))
            draws = rng.lognormal(4, 2, SIZE_BLOCK).astype(np.int64) + 50
            here = blocks == block
            out[here] = draws[cids[here] % SIZE_BLOCK]
        return np.minimum(out, self.params.max_samples_per_user)

    def client(self, cid: int) -> Dataset:
        """User ``cid``'s examples of this stream, identical whenever and wherever generated."""
        p = self.params
        n = int(self.sizes(np.array([cid]))[0])
        rng = self._rng(0, 1, int(cid))
        u, centre = rng.normal(0.0, p.alpha), rng.normal(0.0, p.beta)
        if p.iid:
            shared = np.random.default_rng([seed32(self.seed), 2])
            w = shared.normal(0.0, 1.0, (p.dim, p.num_classes))
            b = shared.normal(0.0, 1.0, p.num_classes)
            mean = np.zeros(p.dim)
        else:
            mean = rng.normal(centre, 1.0, p.dim)
            w = rng.normal(u, 1.0, (p.dim, p.num_classes))
            b = rng.normal(u, 1.0, p.num_classes)
        if self.stream:
            rng = self._rng(self.stream, 1, int(cid))
        std_x = np.arange(1, p.dim + 1, dtype=np.float64) ** (-1.2 / 2)
        x = mean + rng.standard_normal((n, p.dim)) * std_x
        y = np.argmax(x @ w + b, axis=1)
        return Dataset(x.astype(np.float32), y, p.num_classes, name="lazy_synthetic")


def load_lazy_synthetic(
    params: LazySyntheticParams, *, test_fraction: float, seed: int
) -> TaskData:
    """Synthetic(alpha, beta) generated user by user from (seed, cid): clients at O(client) cost.

    The clients are stream 0 (``TaskData.clients``; the task needs
    ``partition.name = "natural"``, one client per user); the central test set
    is the held-out examples (stream 1) of users ``0 .. test_users - 1``.
    ``test_fraction`` is not used.
    """
    test_users = SyntheticUsers(params, seed, stream=1)
    parts = [test_users.client(k) for k in range(params.test_users)]
    test = Dataset(
        np.concatenate([d.x for d in parts]),
        np.concatenate([d.y for d in parts]),
        params.num_classes,
        name="lazy_synthetic",
    )
    train = Dataset(
        np.empty((0, params.dim), dtype=np.float32),
        np.empty(0, dtype=np.int64),
        params.num_classes,
        name="lazy_synthetic",
    )
    return TaskData("lazy_synthetic", train, test, clients=SyntheticUsers(params, seed))


DATASETS.register("lazy_synthetic", load_lazy_synthetic, params=LazySyntheticParams)
