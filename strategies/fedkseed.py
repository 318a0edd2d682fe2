"""FedKSeed's server half: K shared seeds, their accumulators, the model rebuilt by replay.

The server never receives a model. It keeps the pool of K candidate seeds
(drawn from the run's seed), the accumulator A_s of each seed (the weighted sum
of every client's Σĝ for it), and the model w0 − η Σ_s A_s z_s, moved forward
each round by replaying the seeds whose accumulator changed. What it sends a
client is what that client needs to replay the same moves: the K accumulators,
or only those changed since the client's last sync, plus FedKSeed-Pro's seed
scores. Bytes are what Flower serialises, counted by the round loop.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedopt import zo
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.plots import Figure
from fedopt.registry import PLOTS, STRATEGIES
from fedopt.task import build_task
from fedopt.training import load_weights_
from strategies.flower import flower_kwargs

__all__ = ["FedKSeed", "FedKSeedParams"]

W = zo.Wire


@dataclass(frozen=True)
class FedKSeedParams:
    """FedKSeed (Qin et al., ICML 2024): the seed pool and what travels.

    Attributes
    ----------
    k : int
        Number of candidate seeds K (FedKSeed: 4096; its examples use 1024).
    pro : bool
        FedKSeed-Pro: clients sample seeds with probabilities from each seed's
        history of |ĝ| (sent as K one-byte scores).
    sync : {"full", "changed"}
        Send all K accumulators every round (``full``, the paper's scheme) or only
        those that changed since the client's last sync (``changed``: seed
        indices + values, or all K when that is smaller).
    one_byte : bool
        Send every scalar as one byte (sign + log magnitude, 16 levels per factor
        e, after "Just One Byte"): the accumulators down (with a run-wide offset)
        and the clients' sums up (offset per message).
    weighting : {"examples", "equal"}
        Weights of the clients' scalars: their example counts (FedKSeed's
        default) or equal (its ``--equal_weight``).
    pro_clip : float
        |ĝ| is clipped to this before entering the Pro history (``bias_loss_clip``).
    byte_headroom : float
        One-byte accumulators: the top code is set at this many times the largest
        |A| when the offset is first fixed (it is moved, resending every seed,
        only when an accumulator outgrows it).
    """

    k: int = 4096
    pro: bool = False
    sync: Literal["full", "changed"] = "full"
    one_byte: bool = False
    weighting: Literal["examples", "equal"] = "examples"
    pro_clip: float = 1000.0
    byte_headroom: float = 8.0

    def __post_init__(self) -> None:
        check(1 <= self.k <= 2**32, "k", self.k, "an integer in [1, 2^32]")
        check(self.sync in ("full", "changed"), "sync", self.sync, "'full' or 'changed'")
        check(
            self.weighting in ("examples", "equal"),
            "weighting",
            self.weighting,
            "'examples' or 'equal'",
        )
        check(self.pro_clip > 0, "pro_clip", self.pro_clip, "a number > 0")
        check(self.byte_headroom >= 1, "byte_headroom", self.byte_headroom, "a number >= 1")


class FedKSeed(FedAvg):
    """FedKSeed (Qin et al., ICML 2024) with FedKSeed-Pro and one-byte scalars (Zelikman et al.).

    Round r: configure_train sends each selected client the accumulators it
    needs (all K, or the ones changed since its last sync) and, with Pro, the
    seed scores ψ̃; aggregate_train adds Σ_k ω_k a_k to the accumulators,
    updates the Pro history, and replays the seeds whose accumulator changed
    on the server's model, which it returns for evaluation. With weight decay 0
    this model is the weighted mean of the clients' local models.

    Replies that carry whole models instead of seed scalars (a client that
    does not train on the pool) are averaged as FedAvg; every client then
    downloads the model once before replaying again.

    Parameters
    ----------
    params : FedKSeedParams
        The strategy section.
    lr : float
        The clients' step size η (the replay uses the same).
    generator_device : str
        Where the perturbations are drawn (the clients' ``generator_device``).
    run_seed : int
        The run's seed, which fixes the seed pool.
    scenario : Scenario or None
        Used to build the model when the round loop does not hand one over.
    """

    def __init__(
        self,
        *,
        params: FedKSeedParams,
        lr: float,
        generator_device: str = "cpu",
        run_seed: int = 0,
        scenario: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.lr = lr
        self.generator_device = generator_device
        self.base_seed = zo.pool_base_seed(run_seed)
        self.seeds = zo.pool_seeds(self.base_seed, params.k)
        k = params.k
        self.total = np.zeros(k, dtype=np.float64)  # Σ of weighted client scalars
        self.acc = np.zeros(k, dtype=np.float32)  # what clients replay (float32 or one-byte)
        self.offset: int | None = None  # one-byte accumulators: the run's offset
        self.version = 0  # aggregations applied to the model
        self.changed_at = np.zeros(k, dtype=np.int64)  # version at which A_s last changed
        self.synced: dict[int, int] = {}  # node -> version it last synced to
        self.resync_below = 0  # nodes synced before this version must download the model
        self.abs_sum = np.zeros(k, dtype=np.float64)  # Pro history: Σ|clip ĝ| per seed
        self.count = np.zeros(k, dtype=np.int64)  # Pro history: entries per seed
        self.model: nn.Module | None = None
        self.noise: zo.Noise | None = None
        self._scenario = scenario
        # one-byte codes of ``acc`` (all zero, offset 0, until the offset is first fixed)
        self._codes = np.zeros(k, dtype=np.int8) if params.one_byte else None
        self._sent: list[int] = []
        self._replays: dict[int, int] = {}  # node -> seeds it replays to sync this round

    # -- the model ----------------------------------------------------------------------
    def bind_model(self, model: nn.Module) -> None:
        """Take a copy of the run's initial model as the one to replay on (round loop hook)."""
        self.model = copy.deepcopy(model)
        self.noise = zo.Noise(self.model, device=self.generator_device)

    def _need_model(self) -> zo.Noise:
        if self.noise is None:
            if self._scenario is None:
                raise RuntimeError("strategy 'fedkseed' has no model: call bind_model first")
            self.bind_model(build_task(self._scenario).new_model())
        assert self.noise is not None
        return self.noise

    # -- what is sent -------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        """FedKSeed-Pro's ψ̃ as the uint8 codes clients receive."""
        return zo.scores_to_byte(zo.pro_scores(self.abs_sum, self.count, clip=self.params.pro_clip))

    def probabilities(self) -> np.ndarray:
        """The seed probabilities clients sample with this round (uniform without Pro)."""
        if not self.params.pro:
            return np.full(self.params.k, 1.0 / self.params.k)
        return zo.probabilities_from_scores(zo.scores_from_byte(self.scores()))

    def _values(self, idx: np.ndarray | None) -> np.ndarray:
        values = self.acc if self._codes is None else self._codes
        return values if idx is None else values[idx]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected node: the accumulators it needs (+ Pro scores), no model."""
        nodes = list(grid.get_node_ids())
        self._sent = nodes
        base = ConfigRecord(
            {
                **dict(config.items()),
                "server-round": server_round,
                W.SEED: self.base_seed,
                W.K: self.params.k,
                W.VERSION: self.version,
            }
        )
        if self.params.one_byte:
            base[W.BYTE_OFFSET] = self.offset or 0
        shared = ArrayRecord()
        if self.params.sync == "full":
            shared[W.ACC] = zo.wire_array(self._values(None))
        if self.params.pro:
            shared[W.SCORES] = zo.wire_array(self.scores())
        messages = []
        self._replays = {
            n: int(np.count_nonzero(self.changed_at > self.synced.get(n, 0))) for n in nodes
        }
        for node in nodes:
            payload, cfg = shared, base
            if self.params.sync == "changed":
                since = self.synced.get(node, 0)
                idx = np.flatnonzero(self.changed_at > since)
                gaps, values = zo.pack_indices(idx, self.params.k), self._values(idx)
                payload = ArrayRecord(dict(shared.items()))
                if gaps.nbytes + values.nbytes < self._values(None).nbytes:
                    payload[W.INDEX] = zo.wire_array(gaps)
                    payload[W.ACC] = zo.wire_array(values)
                else:  # most seeds changed (a client away for long): all K are smaller
                    payload[W.ACC] = zo.wire_array(self._values(None))
                cfg = ConfigRecord({**dict(base.items()), W.BASE: since})
            content = RecordDict({W.PAYLOAD: payload, "config": cfg})
            if self.synced.get(node, 0) < self.resync_below:
                content["arrays"] = arrays
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        return messages

    # -- what comes back ----------------------------------------------------------------
    def _canonical(self) -> np.ndarray:
        """The accumulators clients will reconstruct from what is sent (float32)."""
        if not self.params.one_byte:
            return self.total.astype(np.float32)
        top = float(np.abs(self.total).max(initial=0.0))
        if top > 0 and (self.offset is None or top > zo.from_bytes(np.int8([127]), self.offset)[0]):
            self.offset = zo.byte_offset(top * self.params.byte_headroom)
        if self.offset is None:
            return np.zeros_like(self.acc)
        self._codes = zo.to_bytes(self.total, self.offset)
        return zo.from_bytes(self._codes, self.offset)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the weighted client scalars, update the Pro history, replay the changed seeds."""
        replies = [r for r in replies if not r.has_error()]
        ups = [
            zo.decode_reply({k: zo.wire_values(a) for k, a in r.content["arrays"].items()})
            for r in replies
        ]
        if not replies:
            return None, None
        if any(u is None for u in ups):
            return self._aggregate_models(server_round, replies)
        weights = np.array(
            [float(r.content["metrics"][self.weighted_by_key]) for r in replies]
            if self.params.weighting == "examples"
            else [1.0] * len(replies)
        )
        weights = weights / weights.sum()
        for w, up in zip(weights, ups, strict=True):
            np.add.at(self.total, up["idx"], w * up["g"])
            if "abs" in up:
                np.add.at(self.abs_sum, up["idx"], up["abs"])
                np.add.at(self.count, up["idx"], up["n"])
        noise = self._need_model()
        new = self._canonical()
        moved = zo.replay_delta_(noise, self.seeds, new, self.acc, lr=self.lr)
        self.changed_at[new != self.acc] = self.version + 1
        for r in replies:
            self.synced[r.metadata.src_node_id] = self.version
        for node in set(self._sent) - {r.metadata.src_node_id for r in replies}:
            self.synced.pop(node, None)  # its state is unknown: send everything next time
        self.acc = new
        self.version += 1
        contents = [r.content for r in replies]
        metrics = MetricRecord(dict(self.train_metrics_aggr_fn(contents, self.weighted_by_key)))
        metrics["zo_seeds_moved"] = moved
        metrics["zo_replayed_mean"] = float(
            np.mean([self._replays.get(r.metadata.src_node_id, 0) for r in replies])
        )
        metrics["zo_seeds_nonzero"] = int(np.count_nonzero(self.acc))
        if self.params.pro:
            p = self.probabilities()
            metrics["zo_pro_ratio"] = float(p.max() / p.min())
        assert self.model is not None
        return ArrayRecord(self.model.state_dict()), metrics

    def _aggregate_models(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies with whole models: FedAvg them; clients download the result once."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.model is not None:
            load_weights_(self.model, arrays.to_torch_state_dict())
        self.version += 1
        self.resync_below = self.version
        return arrays, metrics

    def summary_extra(self) -> dict[str, Any]:
        """The pool and its use, for summary.json."""
        p = self.params
        return {
            "fedkseed": {
                "k": p.k,
                "pro": p.pro,
                "sync": p.sync,
                "one_byte": p.one_byte,
                "seeds_nonzero": int(np.count_nonzero(self.acc)),
                "aggregations": self.version,
                "byte_offset": self.offset,
            }
        }


def _check_scenario(scenario: Any) -> None:
    """The clients must train on the pool (client ``fedkseed``)."""
    if scenario.client.name != "fedkseed":
        raise ConfigError(
            "client.name",
            scenario.client.name,
            "'fedkseed' (strategy 'fedkseed' aggregates seed scalars, not models)",
        )


def _fedkseed(params: FedKSeedParams, *, scenario: Any) -> FedKSeed:
    """FedKSeed (Qin et al., ICML 2024): K shared seeds; clients send (seed, scalar) pairs."""
    client = scenario.client.params
    return FedKSeed(
        **flower_kwargs(),
        params=params,
        lr=float(getattr(client, "lr", 1e-3)),
        generator_device=str(getattr(client, "generator_device", "cpu")),
        run_seed=scenario.run.seed,
        scenario=scenario,
    )


_fedkseed.check_scenario = _check_scenario  # type: ignore[attr-defined]
_fedkseed.requires = {"client": {"name": "fedkseed"}}  # type: ignore[attr-defined]

STRATEGIES.register("fedkseed", _fedkseed, params=FedKSeedParams)
PLOTS.register(
    "fedkseed_seeds",
    Figure(
        "zo_seeds_vs_round.png",
        "round",
        "Round",
        "Seeds",
        ("zo_seeds_moved", "zo_seeds_nonzero"),
    ),
)
