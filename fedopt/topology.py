"""Graphs, gossip (mixing) matrices, communication schedules and parameter mixing.

Decentralized training (Zhu et al. 2025, "single global merge"; Lian et al.
2017, D-PSGD) lets every node keep its own model and, every H local steps,
replace it by a weighted mean of its own and its neighbours' models,
θ_k ← Σ_l W_kl θ_l. Row ``k`` of the adjacency matrices here lists the nodes
``k`` *receives* from (no self loops); a mixing matrix adds the node itself.

Pure numpy: the server draws each round's matrix from (run seed, round) and
relays what each row asks for; the nodes apply :func:`mix`. networkx has the
static graphs but not the paper's time-varying random-r peers, the torus
layout for any node count or the mixing rules, so the few lines are written
here, once for both halves of the method.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACTION_KEY",
    "ADOPT_KEY",
    "BATCHES_KEY",
    "CALIBRATE_KEY",
    "MERGE_WEIGHT_KEY",
    "MIXINGS",
    "PEERS_KEY",
    "REPORT_KEY",
    "SCHEDULES",
    "SELF_WEIGHT_KEY",
    "TOPOLOGIES",
    "WEIGHTS_KEY",
    "GossipPlan",
    "Topology",
    "complete_graph",
    "consensus_distance",
    "erdos_renyi_graph",
    "exponential_graph",
    "metropolis_weights",
    "mix",
    "peer_key",
    "random_peers",
    "ring_graph",
    "torus_graph",
    "torus_shape",
    "uniform_weights",
]


#: Keys of the gossip protocol's messages, shared by the server loop and the node client.
#: ConfigRecord: what the node does (``"train"``: mix, then local steps; ``"merge"``: take
#: the merged model and/or re-estimate BatchNorm statistics on local data).
ACTION_KEY = "gossip-action"
#: ConfigRecord: ids of the peers whose models the message carries, their weights W_kl, W_kk.
PEERS_KEY = "mix-peers"
WEIGHTS_KEY = "mix-weights"
SELF_WEIGHT_KEY = "mix-self"
#: ConfigRecord: 1 when the node must send its model back (relay, evaluation, merge).
REPORT_KEY = "report-model"
#: ConfigRecord of a merge message: 1 to adopt the merged model, 1 to recalibrate BatchNorm.
ADOPT_KEY = "adopt"
CALIBRATE_KEY = "calibrate"
#: MetricRecord: uniform weight of a node in the merge; BatchNorm calibration batches.
MERGE_WEIGHT_KEY = "merge-weight"
BATCHES_KEY = "calibration-batches"


def peer_key(node: int) -> str:
    """RecordDict key under which a message carries the model of peer ``node``."""
    return f"peer/{node}"


def _empty(m: int) -> np.ndarray:
    return np.zeros((m, m), dtype=bool)


def ring_graph(m: int, **_: object) -> np.ndarray:
    """Each node hears its left and right neighbour."""
    a = _empty(m)
    for k in range(m):
        a[k, (k - 1) % m] = a[k, (k + 1) % m] = True
    np.fill_diagonal(a, False)
    return a


def torus_shape(m: int) -> tuple[int, int]:
    """(rows, cols) of the most square 2-D grid with ``m`` cells (rows <= cols)."""
    rows = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return rows, m // rows


def torus_graph(m: int, **_: object) -> np.ndarray:
    """A 2-D torus: each node hears the cells above, below, left and right (wrapping)."""
    rows, cols = torus_shape(m)
    a = _empty(m)
    for k in range(m):
        i, j = divmod(k, cols)
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            a[k, ((i + di) % rows) * cols + (j + dj) % cols] = True
    np.fill_diagonal(a, False)
    return a


def exponential_graph(m: int, **_: object) -> np.ndarray:
    """Node k hears k + 2^j (mod m) for every 2^j < m (directed; log2(m) peers)."""
    a = _empty(m)
    hop = 1
    while hop < m:
        for k in range(m):
            a[k, (k + hop) % m] = True
        hop *= 2
    np.fill_diagonal(a, False)
    return a


def complete_graph(m: int, **_: object) -> np.ndarray:
    """Every node hears every other node."""
    return ~np.eye(m, dtype=bool)


def erdos_renyi_graph(m: int, *, edge_probability: float, rng: np.random.Generator) -> np.ndarray:
    """G(m, p): each undirected edge present independently with probability ``edge_probability``."""
    upper = np.triu(rng.random((m, m)) < edge_probability, k=1)
    return upper | upper.T


def random_peers(m: int, *, r: float, rng: np.random.Generator) -> np.ndarray:
    """The paper's random-r topology: ⌊r⌋ random peers, plus one more with probability frac(r).

    Node by node, in order: a uniform draw decides the extra peer, then the
    peers are drawn uniformly without replacement among the other nodes (at
    most ``m - 1``). r = 0.2: one peer with probability 0.2, otherwise none.
    """
    a = _empty(m)
    whole, frac = math.floor(r), r - math.floor(r)
    for k in range(m):
        extra = int(rng.random() < frac)
        count = min(whole + extra, m - 1)
        if count:
            others = np.array([j for j in range(m) if j != k])
            a[k, rng.choice(others, size=count, replace=False)] = True
    return a


def uniform_weights(adjacency: np.ndarray) -> np.ndarray:
    """W_kl = 1 / (|N_k| + 1) on the node and its neighbours: row-stochastic."""
    a = np.asarray(adjacency, dtype=bool) | np.eye(len(adjacency), dtype=bool)
    return a / a.sum(axis=1, keepdims=True)


def metropolis_weights(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings: W_kl = 1 / (1 + max(d_k, d_l)) on edges, the rest on the diagonal.

    Symmetric and doubly stochastic for an undirected graph (the average of
    the node models is preserved by every gossip step).

    Raises
    ------
    ValueError
        If the graph is directed.
    """
    a = np.asarray(adjacency, dtype=bool)
    if not np.array_equal(a, a.T):
        raise ValueError("Metropolis-Hastings weights need an undirected (symmetric) graph")
    deg = a.sum(axis=1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


@dataclass(frozen=True)
class Topology:
    """How a graph is drawn: the builder, whether edges are one-way, whether it changes each round.

    Attributes
    ----------
    build : callable
        ``build(m, *, rng, r, edge_probability) -> bool adjacency (m, m)``.
    directed : bool
        True when an edge k <- l does not imply l <- k (Metropolis weights need undirected).
    per_round : bool
        True when a fresh graph is drawn every round (else once per run).
    """

    build: Callable[..., np.ndarray]
    directed: bool
    per_round: bool


def _static(fn: Callable[[int], np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda m, **_: fn(m)


TOPOLOGIES: Mapping[str, Topology] = types.MappingProxyType(
    {
        "ring": Topology(_static(ring_graph), directed=False, per_round=False),
        "torus": Topology(_static(torus_graph), directed=False, per_round=False),
        "exponential": Topology(_static(exponential_graph), directed=True, per_round=False),
        "complete": Topology(_static(complete_graph), directed=False, per_round=False),
        "erdos_renyi": Topology(
            lambda m, *, rng, edge_probability, **_: erdos_renyi_graph(
                m, edge_probability=edge_probability, rng=rng
            ),
            directed=False,
            per_round=False,
        ),
        "random": Topology(
            lambda m, *, rng, r, **_: random_peers(m, r=r, rng=rng), directed=True, per_round=True
        ),
    }
)

MIXINGS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = types.MappingProxyType(
    {"uniform": uniform_weights, "metropolis": metropolis_weights}
)


def _sparse(progress: float, point: float, window: float) -> str:
    return "sparse"


#: ``phase(progress, point, window)``: ``"none"`` (no communication), ``"sparse"`` (the
#: topology) or ``"dense"`` (the complete graph) for a round at ``progress`` = round / rounds.
SCHEDULES: Mapping[str, Callable[[float, float, float], str]] = types.MappingProxyType(
    {
        "none": lambda progress, point, window: "none",
        "fixed": _sparse,
        "truncate": lambda progress, point, window: "dense" if progress >= point else "sparse",
        "windowed": lambda progress, point, window: (
            "dense" if point <= progress < point + window else "sparse"
        ),
    }
)


@dataclass(frozen=True)
class GossipPlan:
    """Which mixing matrix W(t) every round of a run uses.

    Parameters
    ----------
    num_nodes : int
        Nodes m.
    topology : str
        A key of :data:`TOPOLOGIES`.
    mixing : str
        A key of :data:`MIXINGS`.
    schedule : str
        A key of :data:`SCHEDULES`.
    r : float
        Random topology: expected extra peers per node and round.
    edge_probability : float
        Erdős–Rényi edge probability.
    point, window : float
        Schedule positions as fractions of the run.
    seed : int
        Run seed; random graphs are drawn from (seed, round).
    """

    num_nodes: int
    topology: str = "random"
    mixing: str = "uniform"
    schedule: str = "fixed"
    r: float = 0.2
    edge_probability: float = 0.3
    point: float = 0.9
    window: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, table in (("topology", TOPOLOGIES), ("mixing", MIXINGS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in table:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: one of {sorted(table)}")
        if self.mixing == "metropolis" and TOPOLOGIES[self.topology].directed:
            raise ValueError(f"metropolis mixing needs an undirected topology, not {self.topology}")

    def phase(self, round_: int, rounds: int) -> str:
        """``"none"``, ``"sparse"`` or ``"dense"`` for round ``round_`` (1-based) of ``rounds``."""
        return SCHEDULES[self.schedule](round_ / rounds, self.point, self.window)

    def adjacency(self, round_: int, rounds: int) -> np.ndarray:
        """Who each node hears in round ``round_`` (bool, row k = the nodes k receives from)."""
        m, phase = self.num_nodes, self.phase(round_, rounds)
        if phase == "none":
            return _empty(m)
        if phase == "dense":
            return complete_graph(m)
        topo = TOPOLOGIES[self.topology]
        key = [self.seed, round_ if topo.per_round else 0, 7]
        rng = np.random.default_rng(np.random.SeedSequence(key))
        return topo.build(m, rng=rng, r=self.r, edge_probability=self.edge_probability)

    def matrix(self, round_: int, rounds: int) -> np.ndarray:
        """The row-stochastic mixing matrix W(round_)."""
        a = self.adjacency(round_, rounds)
        if not a.any():
            return np.eye(self.num_nodes)
        return MIXINGS[self.mixing](a)


def mix(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Σ_i weights[i] · states[i] per floating array, summed in float64 in the given order.

    The first state is the node's own: its dtypes are kept and its
    non-floating arrays (counters) are copied, never averaged.
    """
    if len(states) != len(weights) or not states:
        raise ValueError("mix needs one weight per state and at least one state")
    out: dict[str, np.ndarray] = {}
    for key, own in states[0].items():
        own = np.asarray(own)
        if own.dtype.kind != "f":
            out[key] = own.copy()
            continue
        acc = np.zeros(own.shape, dtype=np.float64)
        for state, w in zip(states, weights, strict=True):
            acc += float(w) * np.asarray(state[key], dtype=np.float64)
        out[key] = acc.astype(own.dtype)
    return out


def consensus_distance(states: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Ξ² = (1/m) Σ_k ‖θ_k − θ̄‖² over the floating arrays, θ̄ the uniform mean."""
    if not states:
        return math.nan
    total = 0.0
    for key, first in states[0].items():
        if np.asarray(first).dtype.kind != "f":
            continue
        stack = np.stack([np.asarray(s[key], dtype=np.float64) for s in states])
        total += float(((stack - stack.mean(axis=0)) ** 2).sum())
    return total / len(states)
