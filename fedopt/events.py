"""The event schedule of asynchronous training on the virtual clock: dispatches, aggregations.

Asynchronous federated learning is a discrete-event simulation. Each client
starts from the global version it received and returns after its simulated
duration (the :class:`~fedopt.heterogeneity.VirtualClock`'s
``work / (base_rate * speed)``); a :class:`Schedule` decides, from the
clients' return times alone, when the server aggregates and whose updates
it applies. :class:`Timeline` keeps the in-flight dispatches and steps from
one aggregation to the next; :func:`simulate` runs a whole schedule for
fixed durations (the FedFix code's ``clients_time_schedule``), and
:class:`VersionStore` keeps exactly the global versions that an in-flight
client still started from. Nothing here sleeps or reads wall time, so the
order of events is a function of the durations only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedopt.training import LocalTrainConfig

__all__ = [
    "TIME_TOLERANCE",
    "Aggregation",
    "ArrivalSchedule",
    "BufferSchedule",
    "Dispatch",
    "FixedPeriodSchedule",
    "Schedule",
    "SyncSchedule",
    "Timeline",
    "VersionStore",
    "planned_work",
    "simulate",
]

#: Relative tolerance under which two simulated times count as equal, so that a client
#: returning at ``0.2 + 0.4`` makes the aggregation at ``3 * 0.2`` (floating-point sums).
TIME_TOLERANCE = 1e-9


def _at_or_before(t: float, deadline: float) -> bool:
    return t <= deadline + TIME_TOLERANCE * max(1.0, abs(deadline))


@dataclass(frozen=True)
class Dispatch:
    """One piece of local work: client ``cid`` starts from global ``version`` at ``start``.

    Attributes
    ----------
    cid : int
        The client.
    version : int
        Index of the global model it trains from (0 is the initial model).
    start : float
        Simulated time at which it received that model.
    duration : float
        Simulated seconds its local work lasts.
    """

    cid: int
    version: int
    start: float
    duration: float

    @property
    def end(self) -> float:
        """Simulated time at which the update reaches the server."""
        return self.start + self.duration


@dataclass(frozen=True)
class Aggregation:
    """The server's ``index``-th aggregation (it makes version ``index``) at simulated ``time``."""

    index: int
    time: float
    cids: tuple[int, ...]


class Schedule(ABC):
    """When the server aggregates, and which returned updates it applies."""

    @abstractmethod
    def next(self, index: int, returns: Mapping[int, float]) -> tuple[float, list[int]]:
        """Time and (sorted) participants of aggregation ``index`` given each client's return."""


class SyncSchedule(Schedule):
    """Synchronous FedAvg (McMahan et al. 2017) on the clock: wait for every client."""

    def next(self, index: int, returns: Mapping[int, float]) -> tuple[float, list[int]]:
        return max(returns.values()), sorted(returns)


@dataclass(frozen=True)
class FixedPeriodSchedule(Schedule):
    """FedFix (Fraboni et al. 2023): aggregate at ``index * delta_t`` whatever has returned."""

    delta_t: float

    def next(self, index: int, returns: Mapping[int, float]) -> tuple[float, list[int]]:
        t = index * self.delta_t
        return t, sorted(c for c, r in returns.items() if _at_or_before(r, t))


class ArrivalSchedule(Schedule):
    """Asynchronous FedAvg (Xie et al. 2019): aggregate each update as it arrives.

    Ties go to the lower client id, as ``numpy.argmin`` does in the FedFix code.
    """

    def next(self, index: int, returns: Mapping[int, float]) -> tuple[float, list[int]]:
        r, cid = min((r, c) for c, r in returns.items())
        return r, [cid]


@dataclass(frozen=True)
class BufferSchedule(Schedule):
    """FedBuff (Nguyen et al. 2022): aggregate once ``size`` updates are buffered.

    The buffer holds the ``size`` earliest returns (ties to the lower client id);
    the aggregation happens when the last of them arrives.
    """

    size: int

    def next(self, index: int, returns: Mapping[int, float]) -> tuple[float, list[int]]:
        first = sorted((r, c) for c, r in returns.items())[: self.size]
        return max(r for r, _ in first), sorted(c for _, c in first)


class Timeline:
    """In-flight dispatches and the aggregations they lead to, in simulated-time order.

    Parameters
    ----------
    schedule : Schedule
        The aggregation rule.
    time_budget : float or None
        Last simulated time at which an aggregation may happen (None: no limit).
    max_aggregations : int or None
        Stop after this many aggregations (None: no limit).
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        time_budget: float | None = None,
        max_aggregations: int | None = None,
    ) -> None:
        if time_budget is None and max_aggregations is None:
            raise ValueError("a timeline needs a time budget or a number of aggregations")
        self.schedule = schedule
        self.time_budget = time_budget
        self.max_aggregations = max_aggregations
        self.now = 0.0
        self.index = 0
        self.in_flight: dict[int, Dispatch] = {}

    def dispatch(self, cid: int, *, duration: float) -> Dispatch:
        """Send the current version to ``cid`` now; its update returns ``duration`` later."""
        if cid in self.in_flight:
            raise ValueError(f"client {cid} is already training")
        if not (0.0 <= duration < math.inf):
            raise ValueError(f"duration must be a finite number >= 0, got {duration}")
        d = Dispatch(cid, self.index, self.now, float(duration))
        self.in_flight[cid] = d
        return d

    def within_budget(self, t: float) -> bool:
        """Whether an aggregation at simulated time ``t`` may still happen."""
        return self.time_budget is None or _at_or_before(t, self.time_budget)

    def peek(self) -> Aggregation | None:
        """The next aggregation, or None when it would exceed the budget (or none is possible)."""
        if not self.in_flight:
            return None
        if self.max_aggregations is not None and self.index >= self.max_aggregations:
            return None
        returns = {c: d.end for c, d in self.in_flight.items()}
        t, cids = self.schedule.next(self.index + 1, returns)
        if not self.within_budget(t):
            return None
        return Aggregation(self.index + 1, max(t, self.now), tuple(cids))

    def advance(self, agg: Aggregation) -> list[Dispatch]:
        """Apply ``agg``: move the clock to its time and hand back its participants' dispatches."""
        if agg.index != self.index + 1:
            raise ValueError(f"aggregation {agg.index} is not the next one ({self.index + 1})")
        done = [self.in_flight.pop(c) for c in agg.cids]
        self.now = agg.time
        self.index = agg.index
        return done


def simulate(
    schedule: Schedule,
    durations: Sequence[float],
    *,
    time_budget: float | None = None,
    max_aggregations: int | None = None,
) -> list[tuple[Aggregation, list[Dispatch]]]:
    """The whole schedule for fixed per-client durations: every client starts at 0 from version 0.

    After each aggregation its participants start again from the new version,
    which is what the server loop does with real updates.
    """
    tl = Timeline(schedule, time_budget=time_budget, max_aggregations=max_aggregations)
    for cid, d in enumerate(durations):
        tl.dispatch(cid, duration=d)
    out = []
    while (agg := tl.peek()) is not None:
        done = tl.advance(agg)
        out.append((agg, done))
        for d in done:
            tl.dispatch(d.cid, duration=durations[d.cid])
    return out


class VersionStore:
    """Global model versions: the current one plus every one an in-flight client started from.

    :meth:`acquire` when a client leaves with a version, :meth:`release` when its
    update is applied (or dropped); a version nobody holds is freed at once.
    """

    def __init__(self) -> None:
        self._models: dict[int, Any] = {}
        self._refs: dict[int, int] = {}
        self.current = -1

    def set_current(self, version: int, model: Any) -> None:
        """Make ``model`` the current global version (freeing the previous one if unheld)."""
        previous, self.current = self.current, version
        self._models[version] = model
        self._drop_if_unused(previous)

    def get(self, version: int) -> Any:
        """The stored model of ``version`` (KeyError once freed)."""
        return self._models[version]

    def acquire(self, version: int) -> Any:
        """Hold ``version`` for one more in-flight client and return its model."""
        self._refs[version] = self._refs.get(version, 0) + 1
        return self._models[version]

    def release(self, version: int) -> None:
        """Drop one holder of ``version``; free it when none is left and it is not current."""
        left = self._refs.get(version, 0) - 1
        if left < 0:
            raise ValueError(f"version {version} is not held")
        self._refs[version] = left
        self._drop_if_unused(version)

    def _drop_if_unused(self, version: int) -> None:
        if version != self.current and self._refs.get(version, 0) == 0:
            self._models.pop(version, None)
            self._refs.pop(version, None)

    def held(self) -> list[int]:
        """The versions kept in memory, sorted."""
        return sorted(self._models)

    def holders(self, version: int) -> int:
        """How many in-flight clients started from ``version``."""
        return self._refs.get(version, 0)


def planned_work(params: Any, num_examples: int) -> float | None:
    """Examples a client processes in one local update, known before it trains.

    For :class:`~fedopt.training.LocalTrainConfig` local work this is its
    ``planned_work`` (what :func:`~fedopt.training.train_local` reports; a
    DP-SGD client's expected Poisson work). Other parameter types give None
    (the work is not known in advance).
    """
    if not isinstance(params, LocalTrainConfig):
        return None
    return params.planned_work(int(num_examples))
