"""The learning task of a scenario: its data, the clients' partitions, and the model factory.

Server and clients build the same :class:`Task` from the same scenario, and it
comes out identical everywhere because every random choice in it is seeded by
``run.seed``. Building it is also how a scenario's data-dependent errors
(more clients than examples, a model that does not fit the data) surface
before any engine starts.

A population dataset (:mod:`fedopt.data.population`) has no pool to partition:
its clients are generated from ``(seed, cid)`` when :meth:`Task.client_data`
asks, so building its task costs the central test set, whatever the number
of clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedopt.config import Scenario
from fedopt.data import (
    Dataset,
    TaskData,
    data_params,
    label_histogram,
    load_task_data,
    partition_clients,
    split_client,
    split_sizes,
)
from fedopt.errors import ConfigError
from fedopt.models import build_model
from fedopt.registry import CLIENTS

__all__ = ["Task", "build_task", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, round, client id, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Task:
    """Data and model of one scenario, ready for the server and for any client.

    Attributes
    ----------
    scenario : Scenario
        The scenario the task is built from.
    data : TaskData
        The loaded dataset; ``data.clients`` set for a generated population.
    parts : tuple of numpy.ndarray
        Each client's indices into ``data.train``; empty for a population,
        whose clients are ``0 .. partition.num_clients - 1``.
    """

    scenario: Scenario
    data: TaskData
    parts: tuple[np.ndarray, ...] = ()

    @property
    def num_clients(self) -> int:
        """Number of clients the training pool is split into."""
        if self.data.clients is None:
            return len(self.parts)
        return self.scenario.partition.num_clients

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return self.data.train.input_shape

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return self.data.train.num_classes

    def client_data(self, cid: int) -> tuple[Dataset, Dataset]:
        """The (train, test) split of client ``cid`` (a population's is generated now)."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client id {cid} is outside 0..{self.num_clients - 1}")
        split = {"test_fraction": self.scenario.partition.test_fraction, "cid": cid}
        if self.data.clients is not None:
            pool = self.data.clients.client(cid)
            train_idx, test_idx = split_client(
                np.arange(len(pool)), seed=self.scenario.run.seed, **split
            )
            return pool.subset(train_idx), pool.subset(test_idx)
        train_idx, test_idx = split_client(self.parts[cid], seed=self.scenario.run.seed, **split)
        return self.data.train.subset(train_idx), self.data.train.subset(test_idx)

    def train_sizes(self) -> np.ndarray:
        """int64 training-set size of every client, as :meth:`client_data` splits them.

        Only sizes are computed: no index is permuted and no example is generated.
        """
        if self.data.clients is None:
            sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        else:
            sizes = self.data.clients.sizes(np.arange(self.num_clients))
        return split_sizes(sizes, test_fraction=self.scenario.partition.test_fraction)[0]

    def label_histogram(self, cids: Sequence[int] | None = None) -> np.ndarray:
        """Count each class among each client's examples (all clients when ``cids`` is None).

        An int64 array of shape ``(len(cids), num_labels)``; a population's
        clients in ``cids`` are generated to count them.
        """
        train = self.data.train
        cids = range(self.num_clients) if cids is None else cids
        if self.data.clients is None:
            return label_histogram(train.labels, [self.parts[c] for c in cids], train.num_labels)
        pools = [self.data.clients.client(c).labels for c in cids]
        return np.array(
            [np.bincount(y, minlength=train.num_labels) for y in pools], dtype=np.int64
        ).reshape(len(pools), train.num_labels)

    def new_model(self) -> nn.Module:
        """A freshly initialised model (same weights for the same seed, everywhere).

        With a ``[pretrain]`` section the weights come from the cached warm start
        (:mod:`fedopt.pretrain`); a local optimizer's ``prepare_model`` runs last.
        """
        m = self.scenario.model
        model = build_model(
            m.name,
            m.params,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            seed=self.scenario.run.seed,
            text=self.data.train.text,
        )
        if "pretrain" in self.scenario.extras:
            from fedopt.pretrain import load_warm_start

            load_warm_start(model, self.scenario)
        # A local optimizer may check or adapt the model every party uses (e.g. DP-SGD).
        client = CLIENTS.get(self.scenario.client.name, key="client.name").obj
        prepare = getattr(client, "prepare_model", None)
        return model if prepare is None else prepare(model, params=self.scenario.client.params)


def build_task(scenario: Scenario) -> Task:
    """Load the dataset, partition it into clients, check the privacy plan and the model.

    A population dataset is not partitioned: ``partition.name`` must be
    ``natural`` (one client per generated user). The privacy plan
    (:func:`fedopt.privacy.preflight.check_tasks`: δ against the smallest
    client, a reachable target ε for every client's steps) needs only the
    clients' sizes, so it is checked before the model is built, which for
    DP-SGD imports Opacus: a bad plan fails a few seconds sooner.
    """
    from fedopt.privacy.preflight import check_tasks

    d, p = scenario.data, scenario.partition
    data = load_task_data(
        d.name, data_params(scenario), test_fraction=d.test_fraction, seed=scenario.run.seed
    )
    if data.clients is not None:
        if p.name != "natural":
            raise ConfigError(
                "partition.name",
                p.name,
                f"'natural' for data.name = '{d.name}', whose clients are its generated users",
            )
        task = Task(scenario, data)
    else:
        parts = partition_clients(
            data.train, p.name, p.params, num_clients=p.num_clients, seed=scenario.run.seed
        )
        task = Task(scenario, data, tuple(parts))
    check_tasks([task])
    task.new_model()
    return task


def as_tensors(ds: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's arrays as tensors on ``device``."""
    return torch.from_numpy(ds.x).to(device), torch.from_numpy(ds.y).to(device)
