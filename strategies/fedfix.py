"""FedFix, asynchronous FedAvg, FedBuff and synchronous FedAvg on one virtual clock.

All four share one update rule (Fraboni et al. 2023, eq. of ``FL/server.py``)::

    θ^{n+1} = θ^n + η_g Σ_i d_i (θ_i − θ^{ρ_i})

where ``θ^{ρ_i}`` is the (possibly stale) global version client ``i`` started
from, and differ in when they aggregate (their :class:`~fedopt.events.Schedule`)
and in the weights ``d_i``. ``p_i`` is client ``i``'s share of the federated
objective (its examples over all examples, or ``1/M``) and ``τ_i`` its
simulated duration. Flower's strategies average models that all started from
one global model with normalised weights; these contributions start from
different versions and carry unnormalised weights, so the update is written
here, while message building (``configure_train``/``configure_evaluate``) and
metric averaging are Flower's ``FedAvg``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedopt.errors import ConfigError
from fedopt.events import (
    ArrivalSchedule,
    BufferSchedule,
    FixedPeriodSchedule,
    Schedule,
    SyncSchedule,
    simulate,
)
from fedopt.params import check
from fedopt.registry import STRATEGIES
from fedopt.training import LocalTrainConfig
from strategies.async_loop import AsyncDriver, Contribution
from strategies.flower import flower_kwargs

__all__ = [
    "AsyncParams",
    "ClockStrategy",
    "FedBuffParams",
    "FedFixParams",
    "SyncParams",
    "participation_fractions",
]


@dataclass(frozen=True)
class SyncParams:
    """Every strategy on the clock: the simulated time budget, the objective, the global rate.

    Attributes
    ----------
    time_budget : float or None
        Simulated seconds the run lasts (its last aggregation is at or before
        it); omitted: ``run.rounds`` aggregations.
    importance : str
        ``p_i`` of the federated objective: ``examples`` (n_i / n, FedAvg's) or ``uniform``.
    global_lr : float
        Server rate η_g.
    """

    time_budget: float | None = None
    importance: Literal["examples", "uniform"] = "examples"
    global_lr: float = 1.0

    def __post_init__(self) -> None:
        b = self.time_budget
        check(b is None or 0 < b < math.inf, "time_budget", b, "simulated seconds > 0, or omitted")
        check(0 < self.global_lr < math.inf, "global_lr", self.global_lr, "a finite number > 0")


@dataclass(frozen=True)
class AsyncParams(SyncParams):
    """Asynchronous FedAvg: weights and an optional polynomial staleness discount.

    ``identical``: d_i = 1; ``weight``: d_i = (Σ_j 1/τ_j) τ_i p_i (FedFix code).
    Each d_i is multiplied by (1 + staleness)^(-staleness_exponent) (FedAsync's
    polynomial discount; 0 turns it off).
    """

    weights: Literal["identical", "weight"] = "weight"
    staleness_exponent: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.staleness_exponent
        check(0 <= a < math.inf, "staleness_exponent", a, "a finite number >= 0")


@dataclass(frozen=True)
class FedBuffParams(AsyncParams):
    """FedBuff: aggregate once ``buffer_size`` updates have arrived.

    ``identical``: d_i = 1/c; ``weight``: d_i = p_i / f_i, where f_i is the
    fraction of aggregations client i joins. ``participation`` says how f_i is
    found: ``long_run`` (the default) uses the long-run share c / (τ_i Σ_j 1/τ_j),
    which exceeds 1 for a client faster than the buffer fills; ``schedule`` counts
    it on the run's own schedule, as the FedFix code does: the aggregations i
    joins over all aggregations the run makes (its time budget, or ``run.rounds``).
    """

    buffer_size: int = 5
    weights: Literal["identical", "weight"] = "identical"
    participation: Literal["long_run", "schedule"] = "long_run"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.buffer_size >= 1, "buffer_size", self.buffer_size, "an integer >= 1")


@dataclass(frozen=True)
class FedFixParams(SyncParams):
    """FedFix-Δt: aggregate every ``delta_t`` simulated seconds whatever has returned.

    ``weight``: d_i = ⌈τ_i/Δt⌉ p_i (the aggregations the update spans), which keeps the
    federated objective; ``identical``: d_i = 1/M, whose surrogate favours fast clients.
    """

    delta_t: float = 0.5
    weights: Literal["identical", "weight"] = "weight"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.delta_t < math.inf, "delta_t", self.delta_t, "simulated seconds > 0")


class ClockStrategy(FedAvg):
    """Asynchronous aggregation on the virtual clock (Fraboni et al. 2023, FedFix framework).

    Parameters
    ----------
    schedule : Schedule
        When to aggregate and whose updates.
    params : SyncParams
        The strategy's scenario parameters.
    name : str
        The registered name, for messages.
    """

    def __init__(self, schedule: Schedule, params: SyncParams, *, name: str) -> None:
        super().__init__(**flower_kwargs())
        self.schedule = schedule
        self.params = params
        self.name = name
        self.time_budget = params.time_budget
        self.importance: np.ndarray | None = None
        self.durations: Mapping[int, float] = {}
        self.current_arrays: ArrayRecord | None = None

    def bind(self, *, importance: Sequence[float], durations: Mapping[int, float]) -> None:
        """The federation: each client's example count and simulated duration."""
        n = np.asarray(importance, dtype=np.float64)
        if self.params.importance == "uniform":
            n = np.ones_like(n)
        self.importance = n / n.sum()
        self.durations = dict(durations)

    def share(self, cid: int) -> float:
        """p_i, the client's share of the federated objective."""
        if self.importance is None:
            raise ValueError("bind() the federation before weighting updates")
        return float(self.importance[cid])

    def rate_sum(self) -> float:
        """Σ_j 1/τ_j over the federation (updates per simulated second, all clients)."""
        return float(sum(1.0 / d for d in self.durations.values()))

    def base_weight(self, c: Contribution) -> float:
        """d_i before any staleness discount; synchronous FedAvg: p_i."""
        return self.share(c.cid)

    def weight(self, c: Contribution) -> float:
        """d_i of one contribution."""
        a = getattr(self.params, "staleness_exponent", 0.0)
        return self.base_weight(c) * (1.0 + c.staleness) ** (-a)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any:
        """Flower's FedAvg messages; the global model is remembered for :meth:`aggregate_train`."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_contributions(
        self, server_round: int, current: ArrayRecord, contributions: Sequence[Contribution]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """θ + η_g Σ d_i (θ_i − θ^{ρ_i}) in float64, and the example-weighted training metrics."""
        eta = self.params.global_lr
        weights = [self.weight(c) for c in contributions]
        out = ArrayRecord()
        for key, array in current.items():
            theta = array.numpy()
            if theta.dtype.kind != "f":
                out[key] = array
                continue
            acc = theta.astype(np.float64)
            for c, d in zip(contributions, weights, strict=True):
                local = c.arrays[key].numpy().astype(np.float64)
                acc += eta * d * (local - c.base[key].numpy().astype(np.float64))
            out[key] = Array(acc.astype(theta.dtype))
        metrics = self.train_metrics_aggr_fn(
            [_content(c) for c in contributions], self.weighted_by_key
        )
        metrics["weight_sum"] = float(sum(weights))
        self.current_arrays = out
        return out, metrics

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Synchronous use: every reply started from the last configured global model."""
        ok = [r for r in replies if not r.has_error()]
        if not ok or self.current_arrays is None:
            return None, None
        bound = self.importance is not None
        if not bound:
            sizes = [float(r.content["metrics"][self.weighted_by_key]) for r in ok]
            self.bind(importance=sizes, durations={i: 1.0 for i in range(len(ok))})
        contributions = [
            Contribution(
                cid=int(r.content["metrics"]["cid"]) if bound else i,
                arrays=r.content["arrays"],
                base=self.current_arrays,
                metrics=r.content["metrics"],
                span=1,
                staleness=0,
                duration=1.0,
            )
            for i, r in enumerate(ok)
        ]
        return self.aggregate_contributions(server_round, self.current_arrays, contributions)

    def summary_extra(self) -> dict[str, Any]:
        """The strategy's name and budget, for summary.json."""
        return {"clock_strategy": self.name, "time_budget": self.time_budget}


def _content(c: Contribution) -> RecordDict:
    return RecordDict({"metrics": c.metrics})


class AsyncFedAvg(ClockStrategy):
    """Asynchronous FedAvg (Xie et al. 2019, as in Fraboni et al. 2023): one update per event."""

    def base_weight(self, c: Contribution) -> float:
        if self.params.weights == "identical":
            return 1.0
        return self.rate_sum() * c.duration * self.share(c.cid)


class FedBuff(ClockStrategy):
    """FedBuff (Nguyen et al. 2022): apply the buffer once c updates have arrived.

    Parameters
    ----------
    schedule, params, name
        As for :class:`ClockStrategy`.
    max_aggregations : int or None
        The run's number of aggregations when it has no time budget (``run.rounds``),
        for the ``schedule`` participation fractions.
    """

    def __init__(
        self,
        schedule: Schedule,
        params: FedBuffParams,
        *,
        name: str,
        max_aggregations: int | None = None,
    ) -> None:
        super().__init__(schedule, params, name=name)
        self.max_aggregations = max_aggregations
        self.fractions: dict[int, float] = {}

    def bind(self, *, importance: Sequence[float], durations: Mapping[int, float]) -> None:
        """Bind the federation and, for ``participation = "schedule"``, measure each f_i."""
        super().bind(importance=importance, durations=durations)
        self.fractions = {}
        if self.params.participation == "schedule" and self.params.weights == "weight":
            self.fractions = participation_fractions(
                self.schedule,
                self.durations,
                time_budget=self.time_budget,
                max_aggregations=None if self.time_budget is not None else self.max_aggregations,
            )

    def fraction(self, cid: int) -> float:
        """f_i: the fraction of aggregations client ``cid`` joins."""
        if self.params.participation == "long_run":
            return self.params.buffer_size / (self.rate_sum() * self.durations[cid])
        f = self.fractions.get(cid, 0.0)
        if f <= 0.0:
            raise ValueError(f"client {cid} joins no aggregation of the planned schedule")
        return f

    def base_weight(self, c: Contribution) -> float:
        if self.params.weights == "identical":
            return 1.0 / self.params.buffer_size
        return self.share(c.cid) / self.fraction(c.cid)


def participation_fractions(
    schedule: Schedule,
    durations: Mapping[int, float],
    *,
    time_budget: float | None,
    max_aggregations: int | None,
) -> dict[int, float]:
    """Each client's fraction of the aggregations of the whole planned schedule.

    The FedFix code's ``agg_clients``: the schedule is simulated for the clients'
    fixed durations (``clients_time_schedule``), and f_i is the number of
    aggregations client i joins over the number of aggregations.

    Parameters
    ----------
    schedule : Schedule
        The aggregation rule.
    durations : Mapping[int, float]
        Each client's simulated duration, keyed 0..M-1.
    time_budget : float or None
        The run's time budget.
    max_aggregations : int or None
        The run's number of aggregations when it has no time budget.

    Returns
    -------
    dict[int, float]
        f_i for every client (0 for one that joins none).
    """
    plan = simulate(
        schedule,
        [durations[c] for c in range(len(durations))],
        time_budget=time_budget,
        max_aggregations=max_aggregations,
    )
    joined = dict.fromkeys(range(len(durations)), 0)
    for agg, _ in plan:
        for cid in agg.cids:
            joined[cid] += 1
    total = max(len(plan), 1)
    return {c: n / total for c, n in joined.items()}


class FedFix(ClockStrategy):
    """FedFix (Fraboni et al. 2023): aggregate at fixed times, d_i = ⌈τ_i/Δt⌉ p_i."""

    def base_weight(self, c: Contribution) -> float:
        share = self.share(c.cid)
        if self.params.weights == "identical":
            return 1.0 / len(self.importance)
        return c.span * share


def _check_clock(scenario: Any) -> None:
    """The asynchronous loop keeps every client busy and must know each update's duration."""
    if not isinstance(scenario.client.params, LocalTrainConfig):
        raise ConfigError(
            "client.name",
            scenario.client.name,
            "a client whose local work is known before it trains (LocalTrainConfig "
            "parameters), which the asynchronous schedule needs to order updates",
        )
    h, r, n = scenario.heterogeneity, scenario.run, scenario.partition.num_clients
    if h.availability != 1.0:
        raise ConfigError(
            "heterogeneity.availability",
            h.availability,
            "1.0 with a strategy on the asynchronous clock (every client keeps training)",
        )
    if r.clients_per_round not in (None, n):
        raise ConfigError(
            "run.clients_per_round",
            r.clients_per_round,
            f"omitted or {n} with a strategy on the asynchronous clock (every client trains)",
        )
    buffer = getattr(scenario.strategy.params, "buffer_size", 1)
    if buffer > n:
        raise ConfigError("strategy.buffer_size", buffer, f"at most partition.num_clients = {n}")


def _on_clock(factory: Any) -> Any:
    factory.driver = AsyncDriver
    factory.check_scenario = _check_clock
    return factory


@_on_clock
def _sync(params: SyncParams, *, scenario: Any) -> ClockStrategy:
    """Synchronous FedAvg on the asynchronous clock: every client, every aggregation."""
    return ClockStrategy(SyncSchedule(), params, name="sync_fedavg")


@_on_clock
def _async(params: AsyncParams, *, scenario: Any) -> ClockStrategy:
    """Asynchronous FedAvg (Xie et al. 2019): apply each update when it arrives."""
    return AsyncFedAvg(ArrivalSchedule(), params, name="async_fedavg")


@_on_clock
def _fedbuff(params: FedBuffParams, *, scenario: Any) -> ClockStrategy:
    """FedBuff (Nguyen et al. 2022): aggregate once buffer_size updates have arrived."""
    rounds = None if params.time_budget is not None else scenario.run.rounds
    return FedBuff(
        BufferSchedule(params.buffer_size), params, name="fedbuff", max_aggregations=rounds
    )


@_on_clock
def _fedfix(params: FedFixParams, *, scenario: Any) -> ClockStrategy:
    """FedFix (Fraboni et al. 2023): aggregate every delta_t simulated seconds."""
    return FedFix(FixedPeriodSchedule(params.delta_t), params, name="fedfix")


STRATEGIES.register("sync_fedavg", _sync, params=SyncParams)
STRATEGIES.register("async_fedavg", _async, params=AsyncParams)
STRATEGIES.register("fedbuff", _fedbuff, params=FedBuffParams)
STRATEGIES.register("fedfix", _fedfix, params=FedFixParams)
