"""Decentralized training with a single global merge: its parameters, the merge and registration.

Decentralized training (Zhu et al., "a single global merge suffices"): nodes
gossip over a topology, the server only relays (:mod:`strategies.gossip_loop`),
and one merge at the end averages the node models (:class:`SingleMerge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_arrayrecords,
    validate_message_reply_consistency,
)

from fedopt import topology as tp
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.plots import Figure
from fedopt.registry import PLOTS, STRATEGIES
from strategies.flower import flower_kwargs
from strategies.gossip_loop import DecentralizedDriver

__all__ = ["DecentralizedParams", "SingleMerge"]

Row = dict[str, Any]
Topologies = Literal["ring", "torus", "exponential", "complete", "erdos_renyi", "random"]


@dataclass(frozen=True)
class DecentralizedParams:
    """Decentralized training (Zhu et al. 2025): graph, mixing, schedule, final merge.

    Attributes
    ----------
    topology : str
        Who hears whom: ``ring``, ``torus`` (2-D), ``exponential`` (peers k + 2^j),
        ``complete``, ``erdos_renyi`` (drawn once per run) or ``random`` (the
        paper's random-r peers, redrawn every round).
    r : float
        ``random``: ⌊r⌋ peers per node and round plus one more with probability frac(r).
    edge_probability : float
        ``erdos_renyi``: the probability of each edge.
    mixing : str
        ``uniform`` (1/|N_k ∪ {k}|) or ``metropolis`` (undirected topologies only).
    schedule : str
        ``none`` (never communicate), ``fixed`` (the topology every round),
        ``truncate`` (the complete graph from ``point`` of the run on) or
        ``windowed`` (the complete graph in [point, point + window)).
    point, window : float
        Where the dense phase starts and how long it lasts, as fractions of the run.
    final_merge : bool
        Average every node model after the last round (then re-estimate BatchNorm).
    merge_weighting : str
        ``uniform`` (the paper's (1/m) Σ θ_k) or ``examples`` (FedAvg's weights).
    merge_eval_every : int
        Evaluate the counterfactual merged model every this many rounds (0: last round only).
    """

    topology: Topologies = "random"
    r: float = 0.2
    edge_probability: float = 0.3
    mixing: Literal["uniform", "metropolis"] = "uniform"
    schedule: Literal["none", "fixed", "truncate", "windowed"] = "fixed"
    point: float = 0.9
    window: float = 0.1
    final_merge: bool = True
    merge_weighting: Literal["uniform", "examples"] = "uniform"
    merge_eval_every: int = 1

    def __post_init__(self) -> None:
        check(0 <= self.r < np.inf, "r", self.r, "a finite number of extra peers >= 0")
        p = self.edge_probability
        check(0 < p <= 1, "edge_probability", p, "a probability in (0, 1]")
        check(0 <= self.point <= 1, "point", self.point, "a fraction of the run in [0, 1]")
        check(0 < self.window <= 1, "window", self.window, "a fraction of the run in (0, 1]")
        m = self.merge_eval_every
        check(m >= 0, "merge_eval_every", m, "an integer >= 0 (0: the last round only)")
        check(
            not (self.mixing == "metropolis" and tp.TOPOLOGIES[self.topology].directed),
            "mixing",
            self.mixing,
            f"'uniform' with the directed topology {self.topology!r} "
            "(Metropolis-Hastings needs ring, torus, complete or erdos_renyi)",
        )

    def plan(self, *, num_nodes: int, seed: int) -> tp.GossipPlan:
        """The run's gossip plan."""
        return tp.GossipPlan(
            num_nodes=num_nodes,
            topology=self.topology,
            mixing=self.mixing,
            schedule=self.schedule,
            r=self.r,
            edge_probability=self.edge_probability,
            point=self.point,
            window=self.window,
            seed=seed,
        )


class SingleMerge(FedAvg):
    """The single global merge (Zhu et al. 2025) as a Flower FedAvg over the node models.

    ``merge`` is Flower's ``aggregate_arrayrecords`` weighted by the nodes'
    ``merge-weight`` (1 each: the uniform mean) or by their example counts.
    """

    def __init__(self, params: DecentralizedParams) -> None:
        super().__init__(**flower_kwargs())
        self.params = params
        self.merge_key = (
            tp.MERGE_WEIGHT_KEY if params.merge_weighting == "uniform" else self.weighted_by_key
        )

    def merge(self, contents: Sequence[RecordDict]) -> ArrayRecord:
        """The weighted mean of the node models carried by ``contents``."""
        contents = list(contents)
        validate_message_reply_consistency(contents, self.merge_key, check_arrayrecord=True)
        return aggregate_arrayrecords(contents, self.merge_key)


def _check_scenario(scenario: Any) -> None:
    """Every node trains every round, and only the decentralized client keeps its own model."""
    if scenario.client.name != "decentralized":
        raise ConfigError(
            "client.name",
            scenario.client.name,
            "'decentralized' (strategy 'decentralized' relays peer models to nodes that keep "
            "their own model and optimizer state)",
        )
    n = scenario.partition.num_clients
    if scenario.run.clients_per_round not in (None, n):
        raise ConfigError(
            "run.clients_per_round",
            scenario.run.clients_per_round,
            f"omitted or {n} with strategy 'decentralized' (every node trains every round)",
        )
    if scenario.heterogeneity.availability != 1.0:
        raise ConfigError(
            "heterogeneity.availability",
            scenario.heterogeneity.availability,
            "1.0 with strategy 'decentralized' (every node trains every round)",
        )


def _decentralized(params: DecentralizedParams, *, scenario: Any) -> SingleMerge:
    """Decentralized training with a single global merge (Zhu et al. 2025): gossip, then merge."""
    return SingleMerge(params)


_decentralized.driver = DecentralizedDriver  # type: ignore[attr-defined]
_decentralized.check_scenario = _check_scenario  # type: ignore[attr-defined]
_decentralized.requires = {"client": {"name": "decentralized"}}  # type: ignore[attr-defined]

STRATEGIES.register("decentralized", _decentralized, params=DecentralizedParams)
PLOTS.register(
    "decentralized_accuracy",
    Figure(
        "node_vs_merged_accuracy.png",
        "round",
        "Round",
        "Accuracy",
        ("node_accuracy_mean", "node_accuracy_min", "node_accuracy_max", "merged_accuracy"),
    ),
)
PLOTS.register(
    "decentralized_consensus",
    Figure(
        "consensus_vs_round.png", "round", "Round", "Consensus distance", ("consensus_distance",)
    ),
)
