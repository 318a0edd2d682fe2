"""The asynchronous server loop: push and pull through Flower's Grid, ordered by simulated time.

:class:`AsyncDriver` replaces the synchronous round loop for the strategies of
:mod:`strategies.fedfix`. Every client is always busy: it receives the global
version current when it last returned, trains, and its update is applied at
the aggregation its strategy's :class:`~fedopt.events.Schedule` assigns to its
simulated return time. Messages go out with ``Grid.push_messages`` and come
back with ``Grid.pull_messages``, as in a real asynchronous deployment, but
the order in which updates are applied is decided by the virtual clock alone,
never by which worker answered first: results are the same for a seed
whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from fedopt.clientapp import RESERVED_METRICS
from fedopt.errors import DivergenceError, RunError
from fedopt.events import Aggregation, Timeline, VersionStore, planned_work
from fedopt.records import SelectedGrid, cast_like, non_finite_keys
from fedopt.server import RoundDriver

__all__ = ["VERSION_KEY", "AsyncDriver", "Contribution"]

log = logging.getLogger("fedopt")

#: ConfigRecord key naming the global version a train message carries.
VERSION_KEY = "model-version"

Row = dict[str, Any]


@dataclass(frozen=True)
class Contribution:
    """One client update as the server applies it.

    Attributes
    ----------
    cid : int
        The client.
    arrays : ArrayRecord
        Its local model after training.
    base : ArrayRecord
        The global version it started from.
    metrics : Mapping
        Its reply metrics (``num-examples`` and the training metrics).
    span : int
        Aggregations since it left: ``new version - start version`` (FedFix's ⌈τ_i/Δt⌉).
    staleness : int
        Global updates it missed: ``span - 1``.
    duration : float
        Its simulated duration.
    """

    cid: int
    arrays: ArrayRecord
    base: ArrayRecord
    metrics: Any
    span: int
    staleness: int
    duration: float


class AsyncDriver(RoundDriver):
    """Runs an asynchronous strategy on the virtual clock; one metrics row per aggregation.

    The strategy object provides ``schedule`` (a :class:`~fedopt.events.Schedule`),
    ``time_budget`` (simulated seconds, or None to stop after ``run.rounds``
    aggregations), ``bind(importance=, durations=)`` and
    ``aggregate_contributions(index, current, contributions)``.
    """

    def run(self, grid: Grid) -> ArrayRecord:
        """Dispatch every client, then aggregate event by event until the budget is spent."""
        s, st = self.scenario, self.strategy
        if not callable(getattr(st, "aggregate_contributions", None)):
            raise RunError(f"strategy {s.strategy.name!r} cannot run on the asynchronous loop")
        if self.start(grid):
            t0 = time.perf_counter()
        else:
            t0 = self._begin(grid)
        while True:
            agg = self.timeline.peek()
            pending = self.loop.get("pending")
            if pending is not None:
                self._finish(grid, *pending, last=agg is None, t0=t0)
                self._checkpoint_point(grid, pending[0]["round"], last=agg is None)
            if agg is None:
                break
            arrays, row = self._aggregate(grid, agg)
            self.loop = {"pending": (row, arrays)}
            self._dispatch(grid, list(agg.cids))
        self._drain(grid)
        return self.versions.get(self.versions.current)

    def _begin(self, grid: Grid) -> float:
        """Plan the clients' work, emit round 0 and dispatch every client; returns t0."""
        s, st = self.scenario, self.strategy
        m = self.task.num_clients
        sizes = np.array([len(self.task.client_data(c)[0]) for c in range(m)], dtype=np.float64)
        works = [planned_work(s.client.params, int(n)) for n in sizes]
        if any(w is None for w in works):
            raise RunError(f"client {s.client.name!r} cannot say its work before it trains")
        self.durations = {c: self.clock.duration(c, float(works[c])) for c in range(m)}
        self.works = works
        st.bind(importance=sizes, durations=self.durations)
        self.timeline = Timeline(
            st.schedule,
            time_budget=st.time_budget,
            max_aggregations=None if st.time_budget is not None else s.run.rounds,
        )
        self.versions = VersionStore()
        self.staleness = Counter()
        self.participations = Counter()
        self._arrived: dict[int, Message] = {}
        self._tickets: list[str] = []
        self._down: dict[int, int] = {}
        self._pushed: dict[int, int] = {}
        self._acc: list[tuple[float, float]] = []
        self._held_max = 0
        t0 = time.perf_counter()
        arrays = ArrayRecord(self.model.state_dict())
        self.versions.set_current(0, arrays)
        first: Row = {"round": 0, "sim_time": 0.0, "cum_bytes": 0}
        if s.run.eval_every:
            first.update(self.central_eval(arrays))
        first["wall_time"] = time.perf_counter() - t0
        self.emit(first)
        self._dispatch(grid, list(range(m)))
        self.loop = {}
        return t0

    def _checkpoint_point(self, grid: Grid, index: int, *, last: bool) -> None:
        """Between aggregations; a checkpoint first collects the updates still in flight.

        They are saved as arrived (not yet applied), with the clients' state
        after their training, so a resumed run applies them unchanged.
        """
        cp = self.checkpointer
        if cp is not None and cp.due(self.scenario, index, last=last):
            wanted = self.transport.in_flight(self._tickets)
            self._pull(grid, wanted, timeout=self.scenario.run.timeout)
        self.end_round(index, last=last, pending=None)

    # -- messaging ------------------------------------------------------------------------
    def _dispatch(self, grid: Grid, cids: list[int]) -> None:
        """Send the current version to ``cids``; updates the budget can never use stay unsent."""
        version = self.versions.current
        arrays = self.versions.get(version)
        send = []
        for cid in cids:
            d = self.timeline.dispatch(cid, duration=self.durations[cid])
            if self.timeline.within_budget(d.end):
                send.append(cid)
        if not send:
            return
        view = SelectedGrid(grid, [self.node_of(c) for c in send])
        templates = self.strategy.configure_train(version + 1, arrays, ConfigRecord(), view)
        by_node = {msg.metadata.dst_node_id: msg for msg in templates}
        contents = {}
        for cid in send:
            content = self.client_content(by_node[self.node_of(cid)], cid)
            content["config"][VERSION_KEY] = version
            self._down[cid] = self.bytes.content_size(content)
            contents[cid] = content
        self._tickets.extend(self.transport.push(contents, MessageType.TRAIN))
        for cid in send:
            self.versions.acquire(version)
            self._pushed[cid] = version
        self._held_max = max(self._held_max, len(self.versions.held()))

    def _pull(self, grid: Grid, wanted: set[int], *, timeout: float) -> None:
        """Collect replies until every client in ``wanted`` has one (or ``timeout`` passes)."""
        need = wanted - set(self._arrived)
        self._arrived.update(self.transport.pull(self._tickets, need, timeout=timeout))
        self._tickets = [t for t in self._tickets if self.transport.in_flight([t])]

    def _drain(self, grid: Grid) -> None:
        """Wait for the updates still in flight, so no stale work outlives the run."""
        wanted = self.transport.in_flight(self._tickets)
        self._pull(grid, wanted, timeout=self.scenario.run.timeout)
        self.transport.forget(self._tickets)
        self._tickets = []
        for cid in list(self._arrived):
            del self._arrived[cid]
            self.versions.release(self._pushed.pop(cid))

    # -- one aggregation ------------------------------------------------------------------
    def _aggregate(self, grid: Grid, agg: Aggregation) -> tuple[ArrayRecord, Row]:
        """Apply the updates of ``agg``; return the new global version and its row."""
        s, st = self.scenario, self.strategy
        self._pull(grid, set(agg.cids), timeout=s.run.timeout)
        previous_time = self.timeline.now
        done = self.timeline.advance(agg)
        current = self.versions.get(self.versions.current)
        contributions, failed, up = [], {}, {}
        for d in done:
            reply = self._arrived.pop(d.cid, None)
            if reply is None:
                failed[d.cid] = "no reply before the timeout"
            elif reply.has_error():
                failed[d.cid] = reply.error.reason
            else:
                up[d.cid] = self.bytes.reply_size(reply)
                contributions.append(self._contribution(agg, d, reply))
            if self._pushed.pop(d.cid, None) is not None:
                self.versions.release(d.version)
        for cid, reason in sorted(failed.items()):
            log.warning("client %d dropped from aggregation %d: %s", cid, agg.index, reason)
        bad = [c.cid for c in contributions if not math.isfinite(c.metrics.get("train_loss", 0.0))]
        if bad:
            raise DivergenceError(agg.index, "training loss", bad)
        if contributions:
            new, agg_metrics = st.aggregate_contributions(agg.index, current, contributions)
            new = cast_like(new, current)
            if bad_keys := non_finite_keys(new):
                raise DivergenceError(agg.index, f"aggregate in {bad_keys}", [c.cid for c in done])
        else:
            new, agg_metrics = current, {}
        self.versions.set_current(agg.index, new)
        self.bytes.clear()
        stale = [c.staleness for c in contributions]
        self.staleness.update(stale)
        self.participations.update(c.cid for c in contributions)
        row: Row = {
            "round": agg.index,
            "sim_time": agg.time,
            "round_sim_time": agg.time - previous_time,
            "num_clients": len(contributions),
            "clients": [c.cid for c in contributions],
            "bytes_down": sum(self._down.get(c.cid, 0) for c in contributions),
            "bytes_up": sum(up.values()),
            "staleness_mean": float(np.mean(stale)) if stale else 0.0,
            "staleness_max": max(stale, default=0),
            "versions_held": len(self.versions.held()),
        }
        for key, value in (agg_metrics or {}).items():
            if key not in RESERVED_METRICS and key != "steps":
                row[key] = float(value)
        if failed:
            row["failed_clients"] = sorted(failed)
        metrics = {c.cid: c.metrics for c in contributions}
        row.update(self.client_stats(metrics))
        weights = {c.cid: st.weight(c) for c in contributions}
        row["per_client"] = {
            str(c.cid): {
                "bytes_down": self._down.get(c.cid, 0),
                "bytes_up": up.get(c.cid, 0),
                "sim_duration": c.duration,
                "num_examples": int(c.metrics["num-examples"]),
                "staleness": c.staleness,
                "weight": weights[c.cid],
                **{
                    k: float(v)
                    for k, v in c.metrics.items()
                    if k not in RESERVED_METRICS and isinstance(v, (int, float))
                },
            }
            for c in contributions
        }
        self.client_devices.update("cuda" if m.get("cuda") else "cpu" for m in metrics.values())
        return new, row

    def _contribution(self, agg: Aggregation, d: Any, reply: Message) -> Contribution:
        """Check a reply against the clock's plan and wrap it with its start version."""
        metrics = reply.content["metrics"]
        work = float(metrics["work"])
        if math.isfinite(float(metrics.get("train_loss", 0.0))) and work != self.works[d.cid]:
            raise RunError(
                f"client {d.cid} processed {work:g} examples but the schedule planned "
                f"{self.works[d.cid]:g}: asynchronous strategies need work known in advance"
            )
        span = agg.index - d.version
        return Contribution(
            cid=d.cid,
            arrays=reply.content["arrays"],
            base=self.versions.get(d.version),
            metrics=metrics,
            span=span,
            staleness=span - 1,
            duration=d.duration,
        )

    def _finish(self, grid: Grid, row: Row, arrays: ArrayRecord, *, last: bool, t0: float) -> None:
        """Evaluate (on the eval cadence, and always after the last aggregation) and emit."""
        s, r = self.scenario, row["round"]
        if s.run.eval_every and (r % s.run.eval_every == 0 or last):
            row.update(self.central_eval(arrays))
            self._acc.append((row["sim_time"], row["central_accuracy"]))
            start = 0.75 * row["sim_time"]
            tail = [a for t, a in self._acc if t >= start]
            row["central_accuracy_tail_std"] = float(np.std(tail))
        if s.run.fed_eval_every and (r % s.run.fed_eval_every == 0 or last):
            row.update(self.federated_eval(grid, r, arrays))
            row["bytes_down"] += row["eval_bytes_down"]
            row["bytes_up"] += row["eval_bytes_up"]
        self.cum_bytes += row["bytes_down"] + row["bytes_up"]
        row["cum_bytes"] = self.cum_bytes
        row["wall_time"] = time.perf_counter() - t0
        self.emit(row)

    def summary_extra(self) -> Row:
        """Staleness histogram, contributions per client, versions kept and clock, for summary.json.

        ``clock`` is the virtual clock's state: ``duration_model`` (``work`` or
        ``speed``), ``base_rate``, each client's speed and the simulated time reached.
        """
        out = super().summary_extra()
        if hasattr(self, "timeline"):
            out.update(
                aggregations=self.timeline.index,
                contributions=int(sum(self.participations.values())),
                staleness_histogram={str(k): v for k, v in sorted(self.staleness.items())},
                contributions_per_client={
                    str(c): self.participations.get(c, 0) for c in range(self.task.num_clients)
                },
                versions_held_max=self._held_max,
                client_durations={str(c): d for c, d in sorted(self.durations.items())},
                clock={**self.clock.state_dict(), "now": self.timeline.now},
            )
        return out
