"""What every local optimizer receives and returns: the client job, update and state.

A local optimizer (``clients/*.py``) subclasses :class:`ClientAlgorithm` and
implements :meth:`ClientAlgorithm.fit`. The ClientApp adapter
(:mod:`fedopt.clientapp`) turns a Flower message into a :class:`ClientJob` on a
model that stays resident in the worker, and the returned
:class:`ClientUpdate` into the reply, so one worker can serve many virtual
clients back to back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedopt import codec
from fedopt.training import LocalTrainConfig, load_weights_

__all__ = ["ClientAlgorithm", "ClientJob", "ClientState", "ClientUpdate"]

Record = ArrayRecord | ConfigRecord | MetricRecord


class ClientState:
    """The persistent state of one virtual client inside a node's ``Context.state``.

    Records are stored under ``"<run>/client<cid>/<name>"`` so a node that
    hosts several virtual clients, or serves several runs of a sweep, keeps
    each one's state apart.
    """

    def __init__(self, state: RecordDict, cid: int, *, run_key: str = "") -> None:
        self._state = state
        self._prefix = f"{run_key}/client{cid}/"

    def get(self, name: str) -> Record | None:
        """The record stored under ``name``, or None."""
        return self._state.get(self._prefix + name)

    def set(self, name: str, record: Record) -> None:
        """Store ``record`` under ``name`` (replacing any previous one)."""
        self._state[self._prefix + name] = record

    def __contains__(self, name: object) -> bool:
        return f"{self._prefix}{name}" in self._state


@dataclass
class ClientJob:
    """One round of local work for one virtual client.

    Attributes
    ----------
    cid : int
        The virtual client's id (its partition).
    server_round : int
        The round the server is in.
    model : nn.Module
        The worker's resident model, already holding the global weights.
    x, y : torch.Tensor
        The client's training data, on ``device``.
    config : Mapping
        The round's configuration sent by the strategy.
    content : RecordDict
        The whole incoming message content (for methods that send more than the model).
    state : ClientState
        This client's persistent state.
    generator : torch.Generator
        CPU generator seeded by (run seed, round, cid): the only source of randomness.
    device : torch.device
        Where the model and data live.
    order : callable or None
        Set by the runtime when the scenario orders local data (``[curriculum]``):
        ``order(steps=..., batch_size=...)`` gives the round's index batches. Local
        optimizers pass :meth:`batches` to ``train_local(batches=...)``.
    """

    cid: int
    server_round: int
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    config: Mapping[str, Any]
    content: RecordDict
    state: ClientState
    generator: torch.Generator
    device: torch.device
    order: Callable[..., Iterable[torch.Tensor]] | None = None

    def batches(self, cfg: LocalTrainConfig) -> Iterable[torch.Tensor] | None:
        """The round's ordered index batches for ``cfg``'s steps, or None (shuffled passes)."""
        if self.order is None:
            return None
        return self.order(steps=cfg.total_steps(len(self.x)), batch_size=cfg.batch_size)


@dataclass(frozen=True)
class ClientUpdate:
    """What a local optimizer hands back.

    Attributes
    ----------
    arrays : ArrayRecord
        What travels to the server (the model, or a method's smaller payload).
    num_examples : int
        The aggregation weight.
    work : float
        Examples processed, the virtual clock's unit of work.
    metrics : Mapping[str, float]
        Scalars reported to the server; ``train_loss`` and ``train_accuracy`` by convention.
    """

    arrays: ArrayRecord
    num_examples: int
    work: float
    metrics: Mapping[str, float]


class ClientAlgorithm(ABC):
    """Base class of local optimizers.

    Parameters
    ----------
    params : object
        The client section's parameters (a frozen dataclass).
    scenario : Scenario
        The whole scenario, for optimizers that need more than their own section.

    Attributes
    ----------
    metric_stats : Mapping[str, str]
        Reply metrics the server summarises across clients in each row as
        ``<key>_min``, ``_max``, ``_mean`` and ``_median``: over this round's
        replies (``"round"``), or over the latest value of every client heard
        from so far (``"latest"``, for running totals such as a client's ε,
        whose final per-client values also go to ``summary.json``).

    A subclass may also define a classmethod ``check_scenario(scenario)`` that
    raises :class:`~fedopt.errors.ConfigError` for scenarios it cannot run; the
    validator calls it before anything starts (strategies' factories likewise).
    """

    metric_stats: Mapping[str, str] = {}

    def __init__(self, params: Any, *, scenario: Any) -> None:
        self.params = params
        self.scenario = scenario

    def load_global(self, model: nn.Module, content: RecordDict) -> None:
        """Load the server's arrays into the resident model, in place."""
        load_weights_(model, codec.torch_state(content["arrays"]))

    @abstractmethod
    def fit(self, job: ClientJob) -> ClientUpdate:
        """Train locally on ``job`` and return the update."""
