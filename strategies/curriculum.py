"""Curriculum client selection: the server half of ``[curriculum]``, as a strategy wrapper.

Whenever a scenario has a ``[curriculum]`` section, the run's strategy is
wrapped in :class:`CurriculumStrategy`: it passes every call through to the
strategy it wraps (any of the FedAvg family), records the curriculum settings
and any privacy opt-in in ``summary.json``, and, with ``select = true``,
chooses each round's clients with :class:`ClientScheduler` through the round
loop's ``select_clients`` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedopt.curriculum import CurriculumParams, order_indices, pace
from fedopt.partial import register_linear_wrapper
from fedopt.registry import WRAPPERS
from fedopt.task import derive_seed
from fedopt.wrapper import WrappedStrategy

__all__ = ["ClientScheduler", "CurriculumStrategy", "wrap_curriculum"]

Query = Callable[[list[int]], Mapping[int, Any]]


class ClientScheduler:
    """The client scheduler of Curricula in FL (Vahidian et al., ICCV 2023, ``ClientScheduler``).

    Each scheduling cycle scores every available client (its mean example
    score), orders them (``curriculum``: low score first, ``anti``, ``random``),
    keeps the first P = g_c(u) of them, u being the client updates scheduled so
    far out of T_c = rounds x clients per round (pacing over clients, at least
    one round's worth), shuffles that pool and runs it in rounds of
    ``per_round`` clients; when the pool is used up the next cycle re-scores.

    Parameters
    ----------
    params : CurriculumParams
        ``client_ordering``, ``client_pacing``, ``client_pacing_a``, ``client_pacing_b``.
    rounds, per_round, seed : int
        The run's rounds, clients per round and seed.
    """

    def __init__(self, params: CurriculumParams, *, rounds: int, per_round: int, seed: int) -> None:
        self.params = params
        self.per_round = per_round
        self.seed = seed
        self.total = rounds * per_round
        self.updates = 0
        self.queue: list[list[int]] = []
        self.cycles: list[dict[str, Any]] = []

    def new_cycle(self, server_round: int, scores: Mapping[int, float]) -> None:
        """Order the scored clients, take the paced pool and split it into rounds."""
        p = self.params
        cids = sorted(scores)
        if not cids:
            return
        gen = torch.Generator().manual_seed(derive_seed(self.seed, len(self.cycles), 0, 7))
        values = torch.tensor([float(scores[c]) for c in cids], dtype=torch.float64)
        ordered = [cids[int(i)] for i in order_indices(values, p.client_ordering, generator=gen)]
        size = pace(
            p.client_pacing,
            self.updates,
            a=p.client_pacing_a,
            b=p.client_pacing_b,
            total=self.total,
            n=len(ordered),
            minimum=self.per_round,
        )
        pool = ordered[:size]
        rng = np.random.default_rng(derive_seed(self.seed, len(self.cycles), 0, 8))
        shuffled = [pool[int(i)] for i in rng.permutation(len(pool))]
        self.queue = [
            shuffled[i : i + self.per_round] for i in range(0, len(shuffled), self.per_round)
        ]
        self.cycles.append(
            {"round": server_round, "updates": self.updates, "pool": pool, "order": ordered}
        )

    def next_round(self, server_round: int, available: list[int], query: Query) -> list[int]:
        """The clients of ``server_round``: the next batch of the pool (re-scoring when empty).

        Clients of the batch that are unavailable this round are skipped.
        """
        if not self.queue:
            replies = query(sorted(available))
            self.new_cycle(server_round, {c: float(m["score"]) for c, m in replies.items()})
        if not self.queue:
            return []
        batch = self.queue.pop(0)
        self.updates += len(batch)
        return sorted(c for c in batch if c in set(available))


@register_linear_wrapper
class CurriculumStrategy(WrappedStrategy):
    """Curricula in FL (Vahidian et al., ICCV 2023) around any Flower strategy.

    Configuration and aggregation are the wrapped strategy's; this adds
    curriculum client selection (``select_clients``) when asked for, the
    cycle and pool size to the rows, and the settings to ``summary.json``.
    """

    def __init__(self, strategy: Strategy, *, scenario: Any) -> None:
        super().__init__(strategy)
        self.scenario = scenario
        self.params: CurriculumParams = scenario.extras["curriculum"]
        self.scheduler = ClientScheduler(
            self.params,
            rounds=scenario.run.rounds,
            per_round=scenario.clients_per_round,
            seed=scenario.run.seed,
        )

    def select_clients(
        self, server_round: int, available: list[int], *, query: Query
    ) -> list[int] | None:
        """Curriculum client selection with ``select = true``; None (seeded sampling) otherwise."""
        if not self.params.select:
            return None
        return self.scheduler.next_round(server_round, available, query)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if self.params.select and self.scheduler.cycles:
            metrics = MetricRecord(dict(metrics or {}))
            metrics["curriculum_cycle"] = len(self.scheduler.cycles)
            metrics["curriculum_pool"] = len(self.scheduler.cycles[-1]["pool"])
        return arrays, metrics

    def summary_extra(self) -> dict[str, Any]:
        """The curriculum settings, the scheduling cycles and any private-scoring opt-in."""
        out = super().summary_extra()
        p = self.params
        block: dict[str, Any] = {
            "ordering": p.ordering,
            "scoring": p.scoring,
            "score": p.score,
            "pacing": [p.pacing, p.pacing_a, p.pacing_b],
            "finish_pass": p.finish_pass,
            "select": p.select,
        }
        if p.select:
            block["client_pacing"] = [p.client_pacing, p.client_pacing_a, p.client_pacing_b]
            block["cycles"] = self.scheduler.cycles
        out["curriculum"] = block
        if p.allow_private_scoring:
            out["curriculum_private_scoring"] = {
                "opt_in": True,
                "released": "each scored client's mean example score on its private training "
                "data, per scheduling cycle"
                if p.select
                else "nothing: no client selection",
                "accounted": False,
            }
        return out


def wrap_curriculum(strategy: Strategy, *, scenario: Any) -> Strategy:
    """Wrap the run's strategy when the scenario has a ``[curriculum]`` section."""
    if "curriculum" not in scenario.extras:
        return strategy
    return CurriculumStrategy(strategy, scenario=scenario)


WRAPPERS.register("curriculum", wrap_curriculum)
