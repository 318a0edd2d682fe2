"""The server loop of decentralized training: relay peer models, evaluate nodes, merge once.

There is no server model during training. Each round every node completes
the previous round's gossip step with the peer models this loop relays to it
(the simulated network: W(t) from :class:`fedopt.topology.GossipPlan`), runs H
local steps and sends its model back only when someone needs it: a peer that
hears it next round, or the server's evaluation. Nothing is averaged before
the final merge; the merge itself, and the counterfactual merges every
``merge_eval_every`` rounds, average the node models with Flower's
``aggregate_arrayrecords``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_arrayrecords,
)
from torch import nn

from fedopt import topology as tp
from fedopt.errors import DivergenceError, RunError
from fedopt.records import cast_like, non_finite_keys
from fedopt.server import RoundDriver

if TYPE_CHECKING:
    from strategies.decentralized import DecentralizedParams

__all__ = ["DecentralizedDriver"]

Row = dict[str, Any]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class DecentralizedDriver(RoundDriver):
    """Relays gossip between the nodes of a decentralized run, evaluates them, merges at the end.

    Row keys besides the standard ones: ``node_accuracy_mean/_std/_min/_max``
    and ``node_loss_mean`` (each node model on the central test set),
    ``consensus_distance`` ((1/m) Σ‖θ_k − θ̄‖²), ``merged_accuracy`` and
    ``merged_loss`` (the merged model, counterfactual before the end),
    ``merge_gap`` (merged minus mean node accuracy), ``gossip_peers`` (models
    delivered per node), ``gossip_bytes`` and ``bytes_per_node`` (cumulative
    peer-to-peer traffic per node, the final merge included). The node models
    are those at the end of a round's local steps. ``central_accuracy`` is the
    accuracy of what the run would deliver: the mean node accuracy, and the
    merged model's after the final merge.
    """

    def __init__(self, task: Any, *, emit: Any, run_key: str = "", node_patience: float = 120.0):
        super().__init__(task, emit=emit, run_key=run_key, node_patience=node_patience)
        s = self.scenario
        self.params: DecentralizedParams = s.strategy.params
        self.plan = self.params.plan(num_nodes=task.num_clients, seed=s.run.seed)
        self.has_batchnorm = _has_batchnorm(self.model)
        self.comm_bytes = 0
        self.gossip_rounds = 0
        self.final: Row = {}

    # -- messaging ------------------------------------------------------------------------
    def _send(self, grid: Grid, contents: list[RecordDict], what: str) -> tuple[dict, dict, dict]:
        """One message per node; every node must answer. Returns replies, bytes down and up."""
        nodes = list(range(len(contents)))
        messages = [
            Message(content=c, dst_node_id=self.node_of(k), message_type=MessageType.TRAIN)
            for k, c in enumerate(contents)
        ]
        replies, failed, down, up = self._exchange(grid, messages, nodes, MessageType.TRAIN)
        if failed:
            raise RunError(f"{what}: nodes {sorted(failed)} failed; a decentralized run needs all")
        return dict(replies), down, up

    def gossip_round(
        self, grid: Grid, t: int, w: np.ndarray, models: dict[int, ArrayRecord], needed: set[int]
    ) -> tuple[dict[int, Message], Row]:
        """Relay W's peer models, let every node train, collect the models in ``needed``."""
        m = self.task.num_clients
        contents, gossip, delivered = [], 0, 0
        for k in range(m):
            cfg = ConfigRecord(
                {"server-round": t, tp.ACTION_KEY: "train", tp.REPORT_KEY: int(k in needed)}
            )
            content = RecordDict({"config": cfg})
            peers = [int(j) for j in np.flatnonzero(w[k]) if j != k]
            if peers:
                cfg[tp.PEERS_KEY] = peers
                cfg[tp.WEIGHTS_KEY] = [float(w[k, j]) for j in peers]
                cfg[tp.SELF_WEIGHT_KEY] = float(w[k, k])
                for j in peers:
                    content[tp.peer_key(j)] = models[j]
                    gossip += self.bytes.record_size(tp.peer_key(j), models[j])
                delivered += len(peers)
            if t == 1:
                content["arrays"] = models[k]
            contents.append(content)
        replies, down, up = self._send(grid, contents, f"round {t}")
        metrics = {k: r.content["metrics"] for k, r in replies.items()}
        bad = [k for k, mr in metrics.items() if not np.isfinite(float(mr["train_loss"]))]
        if bad:
            raise DivergenceError(t, "training loss", bad)
        for k in sorted(needed):
            if bad_keys := non_finite_keys(replies[k].content["arrays"]):
                raise DivergenceError(t, f"node model in {bad_keys}", [k])
        durations = {k: self.clock.duration(k, float(mr["work"])) for k, mr in metrics.items()}
        n = np.array([float(metrics[k]["num-examples"]) for k in range(m)])
        loss = np.array([float(metrics[k]["train_loss"]) for k in range(m)])
        acc = np.array([float(metrics[k]["train_accuracy"]) for k in range(m)])
        self.comm_bytes += gossip
        self.gossip_rounds += int(delivered > 0)
        row: Row = {
            "round": t,
            "num_clients": m,
            "clients": list(range(m)),
            "round_sim_time": self.clock.finish_round(durations),
            "bytes_down": sum(down.values()),
            "bytes_up": sum(up.values()),
            "train_loss": float(np.dot(n, loss) / n.sum()),
            "train_accuracy": float(np.dot(n, acc) / n.sum()),
            "gossip_peers": delivered / m,
            "gossip_bytes": gossip,
            "per_client": {
                str(k): {
                    "bytes_down": down[k],
                    "bytes_up": up[k],
                    "sim_duration": durations[k],
                    "num_examples": int(metrics[k]["num-examples"]),
                    "train_loss": float(metrics[k]["train_loss"]),
                    "peers": float(metrics[k]["peers"]),
                }
                for k in range(m)
            },
        }
        return replies, row

    # -- merging --------------------------------------------------------------------------
    def merge(
        self,
        grid: Grid,
        t: int,
        replies: dict[int, Message],
        reference: ArrayRecord,
        *,
        adopt: bool,
    ) -> tuple[ArrayRecord, int, int]:
        """Average the node models; re-estimate BatchNorm on the nodes; ``adopt``: hand it out.

        Returns the merged model and the bytes sent down and up by the merge exchange.
        """
        merged = cast_like(
            self.strategy.merge([replies[k].content for k in sorted(replies)]), reference
        )
        if not (adopt or self.has_batchnorm):
            return merged, 0, 0
        cfg = {
            "server-round": t,
            tp.ACTION_KEY: "merge",
            tp.ADOPT_KEY: int(adopt),
            tp.CALIBRATE_KEY: int(self.has_batchnorm),
        }
        contents = [
            RecordDict({"arrays": merged, "config": ConfigRecord(dict(cfg))})
            for _ in range(self.task.num_clients)
        ]
        answers, down, up = self._send(grid, contents, f"merge after round {t}")
        if adopt:
            durations = {
                k: self.clock.duration(k, float(r.content["metrics"]["work"]))
                for k, r in answers.items()
            }
            self.clock.finish_round(durations)
        if self.has_batchnorm:
            merged = self._recalibrated(merged, [answers[k].content for k in sorted(answers)])
        return merged, sum(down.values()), sum(up.values())

    def _recalibrated(self, merged: ArrayRecord, contents: list[RecordDict]) -> ArrayRecord:
        """The merged model with the batch-weighted mean of the nodes' BatchNorm statistics."""
        used = [c for c in contents if int(c["metrics"][tp.BATCHES_KEY]) > 0]
        if not used:
            return merged
        stats = aggregate_arrayrecords(used, tp.BATCHES_KEY)
        total = sum(int(c["metrics"][tp.BATCHES_KEY]) for c in used)
        out = ArrayRecord()
        for key, array in merged.items():
            if key.endswith("num_batches_tracked") and key in stats:
                out[key] = Array(np.asarray(total, dtype=array.dtype))
            else:
                out[key] = stats[key] if key in stats else array
        return cast_like(out, merged)

    # -- evaluation -----------------------------------------------------------------------
    def node_eval(self, models: dict[int, ArrayRecord], row: Row) -> None:
        """Every node model on the central test set, and the consensus distance."""
        evals = [self.central_eval(models[k]) for k in sorted(models)]
        acc = np.array([e["central_accuracy"] for e in evals])
        row.update(
            node_accuracy_mean=float(acc.mean()),
            node_accuracy_std=float(acc.std()),
            node_accuracy_min=float(acc.min()),
            node_accuracy_max=float(acc.max()),
            node_loss_mean=float(np.mean([e["central_loss"] for e in evals])),
            consensus_distance=tp.consensus_distance(
                [{k: a.numpy() for k, a in models[j].items()} for j in sorted(models)]
            ),
        )
        for k, a in zip(sorted(models), acc, strict=True):
            row["per_client"][str(k)]["node_accuracy"] = float(a)

    # -- the whole run --------------------------------------------------------------------
    def run(self, grid: Grid) -> ArrayRecord:
        """Every round: relay, train, evaluate; then the final merge. Rows go to ``emit``."""
        s, p = self.scenario, self.params
        m, rounds = self.task.num_clients, s.run.rounds
        resumed = self.start(grid)
        t0 = time.perf_counter()
        if resumed:
            init, models, w_prev = self.loop["init"], self.loop["models"], self.loop["w_prev"]
            result, start = self.loop["result"], self.loop["next"]
        else:
            init = ArrayRecord(self.model.state_dict())
            first: Row = {"round": 0, "sim_time": 0.0, "cum_bytes": 0}
            if s.run.eval_every:
                ev = self.central_eval(init)
                first.update(ev, node_accuracy_mean=ev["central_accuracy"], consensus_distance=0.0)
                first["merged_accuracy"] = ev["central_accuracy"]
            first["wall_time"] = time.perf_counter() - t0
            self.emit(first)
            models = {k: init for k in range(m)}
            w_prev = np.eye(m)
            result, start = init, 1
        for t in range(start, rounds + 1):
            self.bytes.clear()
            last = t == rounds
            w_next = self.plan.matrix(t, rounds) if not last else np.eye(m)
            eval_nodes = bool(s.run.eval_every) and (t % s.run.eval_every == 0 or last)
            merge_now = last or bool(p.merge_eval_every and t % p.merge_eval_every == 0)
            heard = {int(j) for k in range(m) for j in np.flatnonzero(w_next[k]) if j != k}
            needed = set(range(m)) if (eval_nodes or merge_now) else heard
            replies, row = self.gossip_round(grid, t, w_prev, models, needed)
            models = {k: replies[k].content["arrays"] for k in sorted(needed)}
            w_prev = w_next
            if eval_nodes:
                self.node_eval(models, row)
                row["central_accuracy"] = row["node_accuracy_mean"]
                row["central_loss"] = row["node_loss_mean"]
            if merge_now:
                adopt = last and p.final_merge
                merged, down, up = self.merge(grid, t, replies, init, adopt=adopt)
                ev = self.central_eval(merged)
                row.update(merged_accuracy=ev["central_accuracy"], merged_loss=ev["central_loss"])
                if "node_accuracy_mean" in row:
                    row["merge_gap"] = row["merged_accuracy"] - row["node_accuracy_mean"]
                row["bytes_down"] += down
                row["bytes_up"] += up
                if adopt:
                    self.comm_bytes += down + up
                    self.comm_bytes += sum(
                        self.bytes.record_size("arrays", a) for a in models.values()
                    )
                    row.update(ev)
                    result = merged
                if s.run.fed_eval_every and (t % s.run.fed_eval_every == 0 or last):
                    row.update(self.federated_eval(grid, t, merged))
                    row["bytes_down"] += row["eval_bytes_down"]
                    row["bytes_up"] += row["eval_bytes_up"]
            self.cum_bytes += row["bytes_down"] + row["bytes_up"]
            row["bytes_per_node"] = self.comm_bytes / m
            row["sim_time"] = self.clock.now
            row["cum_bytes"] = self.cum_bytes
            row["wall_time"] = time.perf_counter() - t0
            self.final = row
            self.emit(row)
            self.end_round(
                t, last=last, next=t + 1, init=init, models=models, w_prev=w_prev, result=result
            )
        return result

    def summary_extra(self) -> Row:
        """The plan, the final node and merged accuracies, and the traffic per node."""
        out = super().summary_extra()
        p = self.params
        out.update(
            topology=p.topology,
            schedule=p.schedule,
            final_merge=p.final_merge,
            gossip_rounds=self.gossip_rounds,
            bytes_per_node=self.comm_bytes / self.task.num_clients,
        )
        for key in ("node_accuracy_mean", "merged_accuracy", "merge_gap", "consensus_distance"):
            if key in self.final:
                out[f"{key}_final"] = self.final[key]
        return out
