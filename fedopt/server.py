"""The synchronous round loop on the server: selection, messaging, aggregation, evaluation.

:class:`RoundDriver` is what fedopt's ServerApp runs. Each round it picks the
participants with a seeded generator (availability first, then sampling),
lets the registered Flower strategy configure and aggregate exactly those,
counts the bytes of every message, advances the virtual clock by the slowest
participant, evaluates centrally and on the clients' test splits, and emits
one metrics row. Replies are sorted by client id before aggregation so the
floating-point sums, hence the results, do not depend on arrival order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedopt import codec, partial, resumable
from fedopt.clientapp import RESERVED_METRICS
from fedopt.errors import DivergenceError, RunError
from fedopt.heterogeneity import VirtualClock, availability, client_speeds, duration_model
from fedopt.privacy.secrecy import NoiseKey
from fedopt.records import (
    CID_KEY,
    RUN_KEY,
    ByteCounter,
    SelectedGrid,
    cast_like,
    non_finite_keys,
    sorted_by_cid,
)
from fedopt.registry import CLIENTS, STRATEGIES, WRAPPERS
from fedopt.resumable import Checkpointer
from fedopt.task import Task, as_tensors, derive_seed
from fedopt.training import evaluate, load_weights_
from fedopt.transport import Transport, pack_plan, virtual_node

__all__ = ["RoundDriver", "build_strategy", "find_hook", "spread", "worst_fraction_mean"]

log = logging.getLogger("fedopt")

Row = dict[str, Any]


def build_strategy(scenario: Any) -> Any:
    """The scenario's strategy, wrapped by every registered wrapper that applies to it."""
    entry = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
    strategy = entry.obj(scenario.strategy.params, scenario=scenario)
    for wrapper in WRAPPERS:
        strategy = wrapper.obj(strategy, scenario=scenario)
    return strategy


def spread(prefix: str, values: list[float]) -> Row:
    """``<prefix>_min/_max/_mean/_median`` of ``values`` (empty when there are none)."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {
        f"{prefix}_min": float(arr.min()),
        f"{prefix}_max": float(arr.max()),
        f"{prefix}_mean": float(arr.mean()),
        f"{prefix}_median": float(np.median(arr)),
    }


def find_hook(strategy: Any, name: str) -> Any:
    """The method ``name`` of ``strategy`` or of a strategy it wraps (``.strategy`` chain)."""
    while strategy is not None:
        if callable(getattr(type(strategy), name, None)):
            return getattr(strategy, name)
        strategy = vars(strategy).get("strategy") if hasattr(strategy, "__dict__") else None
    return None


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (inf past float range, nan stays nan)."""
    return math.exp(loss) if loss < 709.0 else (loss if math.isnan(loss) else math.inf)


def worst_fraction_mean(values: list[float], *, fraction: float = 0.1) -> float:
    """Mean of the lowest ``ceil(fraction * n)`` values (at least one)."""
    if not values:
        return float("nan")
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(sorted(values)[:k]))


class RoundDriver:
    """Runs a scenario's rounds against a Flower Grid.

    Parameters
    ----------
    task : Task
        The scenario's task (data, partitions, model factory).
    emit : callable
        Receives each metrics row as soon as its round ends.
    run_key : str
        Names this run in every message, when several runs share one federation.
    node_patience : float
        Seconds to wait for the federation's nodes to connect.
    """

    def __init__(
        self,
        task: Task,
        *,
        emit: Callable[[Row], None],
        run_key: str = "",
        node_patience: float = 120.0,
    ) -> None:
        codec.install()
        self.task = task
        self.node_patience = node_patience
        self.run_key = run_key
        self.scenario = s = task.scenario
        self.strategy = build_strategy(s)
        self.metric_stats = dict(CLIENTS.get(s.client.name, key="client.name").obj.metric_stats)
        self.latest: dict[str, dict[int, float]] = {k: {} for k in self.metric_stats}
        h = s.heterogeneity
        speeds = client_speeds(h.speed, h.params, num_clients=task.num_clients, seed=s.run.seed)
        self.clock = VirtualClock(
            speeds=speeds, base_rate=h.base_rate, duration_model=duration_model(h.params)
        )
        self.model = task.new_model()
        bind = find_hook(self.strategy, "bind_model")
        if bind is not None:  # strategies that need the model's structure get the run's model
            bind(self.model)
        self.test = as_tensors(task.data.test, torch.device("cpu"))
        self.per_token = self.test[1].ndim > 1  # language modelling: report perplexity too
        self.emit = emit
        self.bytes = ByteCounter()
        self.cum_bytes = 0
        self.client_devices: set[str] = set()
        self.select_bytes = [0, 0]
        self.layout = pack_plan(s, num_clients=task.num_clients)
        self.transport: Transport | None = None
        self.checkpointer: Checkpointer | None = None
        self.last_eval: tuple[float, ArrayRecord] | None = None
        self.restored: dict[str, Any] | None = None
        self.noise_key: NoiseKey | None = None
        self.loop: dict[str, Any] = {}

    def bind_noise_key(self, key: NoiseKey | None) -> None:
        """Keep the run's secret key (for checkpoints) and give it to server-side DP noise.

        The key reaches the strategy only through its ``bind_noise_key`` hook
        (user-level DP noise and client sampling); nothing else on the server
        sees it, and it is written only into checkpoints.
        """
        self.noise_key = key
        bind = find_hook(self.strategy, "bind_noise_key")
        if bind is not None and key is not None:
            bind(key)

    # -- selection ------------------------------------------------------------------------
    def select(
        self, server_round: int, grid: Grid | None = None, arrays: ArrayRecord | None = None
    ) -> list[int]:
        """The clients that train in ``server_round`` (sorted ids).

        The available clients are drawn first. A strategy (or a wrapper around
        it) with a ``select_clients(server_round, available, *, query)`` method
        then picks among them; ``query(cids)`` sends each a ``query`` message
        carrying the global ``arrays`` and returns ``{cid: metrics}`` of those
        that replied. A None answer, or no such method, means seeded sampling.
        """
        s = self.scenario
        mask = availability(
            self.task.num_clients,
            probability=s.heterogeneity.availability,
            seed=s.run.seed,
            round_=server_round,
        )
        pool = np.flatnonzero(mask)
        chooser = find_hook(self.strategy, "select_clients")
        if chooser is not None and grid is not None and arrays is not None:

            def query(cids: list[int]) -> dict[int, Any]:
                return self.query(grid, arrays, cids)

            chosen = chooser(server_round, [int(c) for c in pool], query=query)
            if chosen is not None:
                return sorted(int(c) for c in chosen)
        k = min(s.clients_per_round, len(pool))
        rng = np.random.default_rng(derive_seed(s.run.seed, server_round, 0, 3))
        return sorted(int(c) for c in rng.choice(pool, size=k, replace=False))

    def eval_clients(self, server_round: int) -> list[int]:
        """The clients whose test splits evaluate the global model this round."""
        n = self.task.num_clients
        k = self.scenario.run.fed_eval_clients or n
        if k >= n:
            return list(range(n))
        rng = np.random.default_rng(derive_seed(self.scenario.run.seed, server_round, 0, 4))
        return sorted(int(c) for c in rng.choice(n, size=k, replace=False))

    def node_of(self, cid: int) -> int:
        """The node id strategies address client ``cid`` by (see :mod:`fedopt.transport`)."""
        return virtual_node(cid)

    # -- messaging ------------------------------------------------------------------------
    def client_content(self, template: Message, cid: int) -> RecordDict:
        """A strategy's message content addressed to ``cid``: its id and run in the config."""
        content = RecordDict(dict(template.content.items()))
        config = ConfigRecord(dict(content.get("config", ConfigRecord()).items()))
        config[CID_KEY] = cid
        if self.run_key:
            config[RUN_KEY] = self.run_key
        content["config"] = config
        return content

    def _exchange(
        self,
        grid: Grid,
        messages: list[Message],
        cids: list[int],
        msg_type: str,
        *,
        reduce: int = 0,
    ) -> tuple[list[tuple[int, Message]], dict[int, str], dict[int, int], dict[int, int]]:
        """Address one message per client, send them, and sort the replies by client.

        ``reduce`` > 0: packs answer with group sums (:mod:`fedopt.partial`),
        left in the transport; their clients' replies carry metrics and size only.
        """
        by_node = {m.metadata.dst_node_id: m for m in messages}
        contents = {cid: self.client_content(by_node[self.node_of(cid)], cid) for cid in cids}
        down = {cid: self.bytes.content_size(c) for cid, c in contents.items()}
        replies = self.transport.exchange(
            contents, msg_type, timeout=self.scenario.run.timeout, reduce=reduce
        )
        ok, failed, up = [], {}, {}
        for cid, reply in replies.items():
            size = None if reply.has_error() else partial.reported_size(reply.content)
            up[cid] = self.bytes.reply_size(reply) if size is None else size
            if reply.has_error():
                failed[cid] = reply.error.reason
            else:
                ok.append((cid, reply))
        for cid in set(cids) - set(replies):
            failed[cid] = "no reply before the timeout"
        for cid, reason in sorted(failed.items()):
            log.warning("client %d dropped from round (%s): %s", cid, msg_type, reason)
        return sorted_by_cid(ok), failed, down, up

    def query(self, grid: Grid, arrays: ArrayRecord, cids: list[int]) -> dict[int, Any]:
        """Send ``query`` messages with the global arrays to ``cids``; their reply metrics.

        Their bytes count towards the round's ``bytes_down``/``bytes_up`` and
        ``select_bytes_down``/``select_bytes_up``.
        """
        if not cids:
            return {}
        content = RecordDict({"arrays": arrays, "config": ConfigRecord()})
        messages = [
            Message(content=content, dst_node_id=self.node_of(c), message_type=MessageType.QUERY)
            for c in cids
        ]
        replies, _, down, up = self._exchange(grid, messages, cids, MessageType.QUERY)
        self.select_bytes[0] += sum(down.values())
        self.select_bytes[1] += sum(up.values())
        return {cid: reply.content["metrics"] for cid, reply in replies}

    # -- one round ------------------------------------------------------------------------
    def train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, Row]:
        """Run the training half of a round; return the new global arrays and the row."""
        s = self.scenario
        self.select_bytes = [0, 0]
        cids = self.select(server_round, grid, arrays)
        row: Row = {"round": server_round}
        if any(self.select_bytes):
            row.update(select_bytes_down=self.select_bytes[0], select_bytes_up=self.select_bytes[1])
        if not cids:
            row.update(
                num_clients=0,
                clients=[],
                bytes_down=self.select_bytes[0],
                bytes_up=self.select_bytes[1],
                round_sim_time=0.0,
            )
            release = find_hook(self.strategy, "release_empty_round")
            if release is not None:  # user-level DP, Poisson sampling: the round releases noise
                arrays, agg = release(server_round, arrays)
                row.update({k: float(v) for k, v in (agg or {}).items()})
            return arrays, row
        grid_view = SelectedGrid(grid, [self.node_of(c) for c in cids])
        messages = list(
            self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid_view)
        )
        groups = self.sum_groups()
        replies, failed, down, up = self._exchange(
            grid, messages, cids, MessageType.TRAIN, reduce=groups
        )
        if len(replies) < s.run.min_replies:
            raise RunError(
                f"round {server_round}: {len(replies)} of {len(cids)} clients replied, fewer than "
                f"run.min_replies = {s.run.min_replies}; failures: {failed}"
            )
        metrics = {cid: reply.content["metrics"] for cid, reply in replies}
        bad = [c for c, m in metrics.items() if not math.isfinite(float(m.get("train_loss", 0.0)))]
        if bad:
            raise DivergenceError(server_round, "training loss", bad)
        if groups:
            new_arrays, agg = self.aggregate_sums(server_round, replies, arrays, messages[0])
        else:
            new_arrays, agg = self.strategy.aggregate_train(server_round, [r for _, r in replies])
        if new_arrays is None:
            raise RunError(f"round {server_round}: the strategy aggregated nothing")
        new_arrays = cast_like(new_arrays, arrays)
        if bad_keys := non_finite_keys(new_arrays):
            raise DivergenceError(server_round, f"aggregate in {bad_keys}", list(metrics))
        durations = {c: self.clock.duration(c, float(m["work"])) for c, m in metrics.items()}
        round_time = self.clock.finish_round(durations)
        self.client_devices.update("cuda" if m.get("cuda") else "cpu" for m in metrics.values())
        row.update(
            num_clients=len(replies),
            clients=[c for c, _ in replies],
            round_sim_time=round_time,
            bytes_down=sum(down.values()) + self.select_bytes[0],
            bytes_up=sum(up.values()) + self.select_bytes[1],
        )
        for key, value in (agg or {}).items():
            if key not in RESERVED_METRICS and key != "steps":
                row[key] = float(value)
        if failed:
            row["failed_clients"] = sorted(failed)
        row.update(self.client_stats(metrics))
        row["per_client"] = {
            str(c): {
                "bytes_down": down[c],
                "bytes_up": up.get(c, 0),
                "sim_duration": durations.get(c, 0.0),
                "num_examples": int(metrics[c]["num-examples"]) if c in metrics else 0,
                **{
                    k: float(v)
                    for k, v in (metrics[c].items() if c in metrics else ())
                    if k not in RESERVED_METRICS and isinstance(v, (int, float))
                },
            }
            for c in cids
        }
        return new_arrays, row

    def sum_groups(self) -> int:
        """The number of sum groups this run's train replies are reduced to (0: not reduced)."""
        if self.scenario.run.partial_sums and partial.is_linear(self.strategy):
            return self.layout.groups
        return 0

    def aggregate_sums(
        self,
        server_round: int,
        replies: list[tuple[int, Message]],
        arrays: ArrayRecord,
        instruction: Message,
    ) -> tuple[ArrayRecord | None, Any]:
        """A linear strategy's aggregate from the packs' group sums and the full replies."""
        try:
            return partial.aggregate(
                self.strategy,
                server_round,
                replies,
                self.transport.take_sums(),
                groups=self.layout.groups,
                like=arrays,
                instruction=instruction,
            )
        except ValueError as err:
            raise RunError(f"round {server_round}: {err}") from None

    def client_stats(self, metrics: dict[int, Any]) -> Row:
        """Spread of the client metrics the local optimizer asked the server to summarise."""
        out: Row = {}
        for key, scope in self.metric_stats.items():
            now = {c: float(m[key]) for c, m in metrics.items() if key in m}
            if scope == "latest":
                self.latest[key].update(now)
                out.update(spread(key, list(self.latest[key].values())))
            else:
                out.update(spread(key, list(now.values())))
        return out

    def summary_extra(self) -> Row:
        """Facts for summary.json: each client's final tracked values, the strategy's own."""
        out: Row = {}
        finals = {k: {str(c): v for c, v in sorted(d.items())} for k, d in self.latest.items() if d}
        if finals:
            out["clients_final"] = finals
        extra = getattr(self.strategy, "summary_extra", None)
        if callable(extra):
            out.update(extra())
        return out

    def central_eval(self, arrays: ArrayRecord) -> Row:
        """The global model on the server's held-out test set."""
        load_weights_(self.model, arrays.to_torch_state_dict())
        res = evaluate(self.model, *self.test)
        self.last_eval = (res.accuracy, arrays)  # the weights behind the row's accuracy
        row: Row = {"central_loss": res.loss, "central_accuracy": res.accuracy}
        if self.per_token:
            row["central_perplexity"] = perplexity(res.loss)
        return row

    def federated_eval(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> Row:
        """The global model on the clients' test splits: weighted mean and worst 10%."""
        cids = self.eval_clients(server_round)
        view = SelectedGrid(grid, [self.node_of(c) for c in cids])
        messages = list(
            self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), view)
        )
        replies, _, down, up = self._exchange(grid, messages, cids, MessageType.EVALUATE)
        recs = [r.content["metrics"] for _, r in replies]
        recs = [m for m in recs if int(m["num-examples"]) > 0]
        out: Row = {"eval_bytes_down": sum(down.values()), "eval_bytes_up": sum(up.values())}
        if not recs:
            return out
        n = np.array([int(m["num-examples"]) for m in recs], dtype=np.float64)
        acc = [float(m["eval_accuracy"]) for m in recs]
        loss = np.array([float(m["eval_loss"]) for m in recs])
        out.update(
            fed_loss=float(np.dot(n, loss) / n.sum()),
            fed_accuracy=float(np.dot(n, np.array(acc)) / n.sum()),
            fed_accuracy_worst10=worst_fraction_mean(acc, fraction=0.1),
            fed_clients=len(recs),
        )
        if self.per_token:
            out["fed_perplexity"] = perplexity(out["fed_loss"])
        return out

    def wait_for_nodes(self, grid: Grid, *, poll: float = 0.05) -> list[int]:
        """The federation's node ids, once the nodes the run needs have connected.

        The engine may start the ServerApp before it has registered every node.
        A packed run needs ``pack_nodes`` nodes; an unpacked one, one per client.

        Raises
        ------
        RunError
            Too few nodes once ``node_patience`` seconds have passed.
        """
        deadline = time.monotonic() + min(self.node_patience, self.scenario.run.timeout)
        need = self.layout.nodes
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= need:
                return nodes
            if time.monotonic() > deadline:
                what = "run.pack_nodes" if self.layout.packed else "partition.num_clients"
                raise RunError(
                    f"the federation has {len(nodes)} nodes but {what} = "
                    f"{need}; start it with num-supernodes={need}"
                )
            time.sleep(poll)

    def connect(self, grid: Grid) -> None:
        """Wait for the federation's nodes and open the transport to them."""
        abort = self.checkpointer.aborting if self.checkpointer is not None else None
        self.transport = Transport(grid, self.wait_for_nodes(grid), self.layout, abort=abort)

    # -- checkpoints ----------------------------------------------------------------------
    def start(self, grid: Grid) -> bool:
        """Connect; for a resumed run, restore the checkpoint's state. True when resumed.

        The driver's saved state replaces its fresh one (``self.loop`` says
        where the loop stands), the server's random generators are reset, and
        every client gets its saved ``Context.state`` back.
        """
        self.connect(grid)
        if self.restored is None:
            return False
        payload, self.restored = self.restored, None
        resumable.restore(self, payload["driver"])
        resumable.set_rng_state(payload["rng"])
        resumable.import_clients(self, payload["clients"])
        return True

    def end_round(self, round_: int, *, last: bool, **loop: Any) -> None:
        """Record where the loop stands, then checkpoint (or stop) if it is time to."""
        self.loop = loop
        if self.checkpointer is not None:
            self.checkpointer.after_round(self, round_, last=last)

    # -- the whole run --------------------------------------------------------------------
    def run(self, grid: Grid) -> ArrayRecord:
        """Run every round; rows go to ``emit`` as they finish."""
        s = self.scenario
        resumed = self.start(grid)
        t0 = time.perf_counter()
        if resumed:
            arrays, start = self.loop["arrays"], self.loop["next"]
        else:
            arrays, start = ArrayRecord(self.model.state_dict()), 1
            first: Row = {"round": 0, "sim_time": 0.0, "cum_bytes": 0}
            if s.run.eval_every:
                first.update(self.central_eval(arrays))
            first["wall_time"] = time.perf_counter() - t0
            self.emit(first)
        for r in range(start, s.run.rounds + 1):
            self.bytes.clear()
            arrays, row = self.train_round(grid, r, arrays)
            last = r == s.run.rounds
            if s.run.eval_every and (r % s.run.eval_every == 0 or last):
                row.update(self.central_eval(arrays))
            if s.run.fed_eval_every and (r % s.run.fed_eval_every == 0 or last):
                row.update(self.federated_eval(grid, r, arrays))
                row["bytes_down"] += row["eval_bytes_down"]
                row["bytes_up"] += row["eval_bytes_up"]
            self.cum_bytes += row["bytes_down"] + row["bytes_up"]
            row["sim_time"] = self.clock.now
            row["cum_bytes"] = self.cum_bytes
            row["wall_time"] = time.perf_counter() - t0
            self.emit(row)
            self.end_round(r, last=last, next=r + 1, arrays=arrays)
        return arrays
