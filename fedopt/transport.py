"""How the server's per-client messages reach Flower nodes: one per client, or one per node's pack.

Strategies and server loops address virtual clients: the grid they see
(:class:`~fedopt.records.SelectedGrid`) lists one *virtual node id* per
client (:func:`virtual_node`), the same whatever the federation looks like,
so a strategy's bookkeeping by node id is identical packed and unpacked.
:class:`Transport` maps each client to the Flower node that hosts it and
moves the messages:

- unpacked, every client has its own node and every client message is one
  Flower message;
- packed, ``n`` nodes host the clients (client ``cid`` is in sum group
  ``cid % groups``, on node ``group % n``); the messages of the clients a
  node hosts travel as ONE Flower message whose records are deduplicated
  (the global model that every client receives is carried once), the node
  trains them back to back (:func:`fedopt.clientapp`'s unpacking mod) and
  answers once: with every client's reply, or, when the server asks for it
  (a linear strategy, :mod:`fedopt.partial`), with their models summed per
  sum group beside each client's metrics.

Either way the caller gets one reply per client, addressed from the
client's virtual node (carrying only metrics when its model went into a
group sum, collected by :meth:`Transport.take_sums`), and counts bytes per
client, so metrics are the same.
Replies are awaited without polling when the grid is Flower's in-memory one
(:mod:`fedopt.engine`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedopt.engine import reply_waiter
from fedopt.errors import RunError
from fedopt.partial import GroupSum, is_reduced, split_reduced

__all__ = [
    "PACK_KEY",
    "PackPlan",
    "Transport",
    "pack_plan",
    "pack_content",
    "unpack_content",
    "virtual_node",
]

#: ConfigRecord of a packed message: ``cids`` and, per client, ``c<cid>`` = ["key=slot", ...].
PACK_KEY = "fedopt-pack"
#: ConfigRecord of a packed reply: ``c<cid>`` = the error reason of a client that failed.
PACK_ERRORS_KEY = "fedopt-pack-errors"
#: Error code of a packed client's failure (Flower's ClientApp exception code).
CLIENT_ERROR_CODE = 1


def virtual_node(cid: int) -> int:
    """The node id strategies see for client ``cid`` (stable across pack settings)."""
    return cid + 1


@dataclass(frozen=True)
class PackPlan:
    """Whether a run packs its clients, on how many Flower nodes, and its sum groups.

    A packed node hosts whole sum groups (:mod:`fedopt.partial`): client
    ``cid`` is in group ``cid % groups``, on node ``group % nodes``.
    """

    packed: bool
    nodes: int
    groups: int


def default_pack_nodes(run: Any) -> int:
    """One node per Ray worker of a local Ray (cores / CPUs per client, capped by GPUs)."""
    if run.ray_address:
        return 8
    if run.workers is not None:
        workers = run.workers
    else:
        workers = max(1, (os.cpu_count() or 1) // run.num_cpus)
    if run.num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus:
            workers = min(workers, max(1, int(gpus / run.num_gpus)))
    return workers


def pack_plan(scenario: Any, *, num_clients: int) -> PackPlan:
    """How ``scenario`` with ``num_clients`` clients is laid out on Flower nodes."""
    run = scenario.run
    groups = run.sum_groups
    nodes = min(run.pack_nodes or default_pack_nodes(run), num_clients, groups)
    faults = scenario.extras.get("faults")
    crashes = faults is not None and faults.worker_crash > 0
    packed = {
        "on": True,
        "off": False,
        "auto": num_clients > nodes and not crashes,
    }[run.pack]
    return PackPlan(packed=packed, nodes=nodes if packed else num_clients, groups=groups)


def pack_content(contents: Mapping[int, RecordDict], *, reduce: int = 0) -> RecordDict:
    """One RecordDict carrying every client's content; a record shared by several is stored once.

    ``reduce`` > 0 asks the node to answer with the models summed over that
    many sum groups (:func:`fedopt.partial.reduced_content`).
    """
    out = RecordDict()
    slots: dict[int, str] = {}
    index = ConfigRecord({"cids": [int(c) for c in contents], "reduce": int(reduce)})
    for cid, content in contents.items():
        entries = []
        for key, record in content.items():
            slot = slots.get(id(record))
            if slot is None:
                slot = slots[id(record)] = f"r{len(slots)}"
                out[slot] = record
            entries.append(f"{key}={slot}")
        index[f"c{cid}"] = entries
    out[PACK_KEY] = index
    return out


def unpack_content(content: RecordDict) -> dict[int, RecordDict]:
    """The per-client contents of a packed RecordDict, in pack order."""
    index = content[PACK_KEY]
    out = {}
    for cid in index["cids"]:
        entries = (e.split("=", 1) for e in index[f"c{cid}"])
        out[int(cid)] = RecordDict({key: content[slot] for key, slot in entries})
    return out


def is_pack(content: RecordDict) -> bool:
    """Whether a message content is a pack of several clients' contents."""
    return PACK_KEY in content


def pack_reduce(content: RecordDict) -> int:
    """The number of sum groups a pack's reply should be reduced to (0: one reply per client)."""
    return int(content[PACK_KEY].get("reduce", 0))


class Transport:
    """Sends per-client contents to the nodes that host the clients; returns per-client replies.

    Parameters
    ----------
    grid : Grid
        Flower's grid (all real nodes connected).
    nodes : sequence of int
        The federation's node ids, sorted.
    plan : PackPlan
        Whether to pack, and over how many of ``nodes``.
    abort : callable, optional
        Polled while waiting; when it returns True the wait ends with a RunError
        (a second Ctrl-C: stop at once).
    """

    def __init__(
        self,
        grid: Any,
        nodes: Sequence[int],
        plan: PackPlan,
        *,
        abort: Callable[[], bool] | None = None,
    ) -> None:
        self.grid = grid
        self.abort = abort
        self.plan = plan
        self.nodes = list(nodes)[: plan.nodes] if plan.packed else list(nodes)
        self._waiter = reply_waiter(grid)
        # message id -> (client ids, per-client instruction templates, packed?)
        self._flight: dict[str, tuple[list[int], dict[int, Message], bool]] = {}
        # message id -> per-client replies pulled but not yet claimed
        self._done: dict[str, dict[int, Message]] = {}
        # sum group -> partial sum of a reduced pack reply, until claimed
        self._sums: dict[int, GroupSum] = {}
        #: Every client sent a message so far: the only ones that can hold state.
        self.contacted: set[int] = set()

    def node_of(self, cid: int) -> int:
        """The real Flower node that hosts client ``cid`` (its sum group's node when packed)."""
        if self.plan.packed:
            return self.nodes[(cid % self.plan.groups) % len(self.nodes)]
        return self.nodes[cid % len(self.nodes)]

    def take_sums(self) -> dict[int, GroupSum]:
        """The group sums of the reduced pack replies pulled so far (and forget them)."""
        out, self._sums = self._sums, {}
        return out

    # -- sending ----------------------------------------------------------------------------
    def push(
        self, contents: Mapping[int, RecordDict], msg_type: str, *, reduce: int = 0
    ) -> list[str]:
        """Send each client its content; returns the Flower message ids (the push's ticket).

        ``reduce`` > 0: packs answer with their models summed per sum group
        (collected by :meth:`take_sums`); a client sent on its own answers in full.
        """
        self.contacted.update(contents)
        templates = {
            cid: Message(content=c, dst_node_id=virtual_node(cid), message_type=msg_type)
            for cid, c in contents.items()
        }
        batches: list[tuple[list[int], RecordDict]] = []
        if self.plan.packed:
            by_node: dict[int, list[int]] = {}
            for cid in contents:
                by_node.setdefault(self.node_of(cid), []).append(cid)
            for cids in by_node.values():
                if len(cids) == 1:
                    batches.append((cids, contents[cids[0]]))
                else:
                    pack = pack_content({c: contents[c] for c in cids}, reduce=reduce)
                    batches.append((cids, pack))
        else:
            batches = [([cid], content) for cid, content in contents.items()]
        out = [
            Message(content=c, dst_node_id=self.node_of(cids[0]), message_type=msg_type)
            for cids, c in batches
        ]
        ids = [str(i) for i in self.grid.push_messages(out)]
        if len(ids) != len(out):
            raise RuntimeError(f"the grid accepted {len(ids)} of {len(out)} messages")
        for msg_id, (cids, content) in zip(ids, batches, strict=True):
            self._flight[msg_id] = (cids, {c: templates[c] for c in cids}, is_pack(content))
        return ids

    # -- receiving --------------------------------------------------------------------------
    def in_flight(self, ticket: list[str] | None = None) -> set[int]:
        """Clients of ``ticket`` (default: of every push) whose replies have not been claimed."""
        ids = set(self._flight) | set(self._done) if ticket is None else set(ticket)
        out = {c for i in ids & set(self._flight) for c in self._flight[i][0]}
        return out | {c for i in ids & set(self._done) for c in self._done[i]}

    def pull(
        self, ticket: list[str], wanted: set[int] | None = None, *, timeout: float
    ) -> dict[int, Message]:
        """Claim the replies of ``ticket`` until every client in ``wanted`` has one.

        ``wanted`` defaults to every client of the ticket. Returns per-client
        replies (content or error) addressed from the client's virtual node;
        replies of other pushes that arrive meanwhile are kept for their own
        pull, and clients still missing at ``timeout`` stay in flight.
        """
        ids = set(ticket)
        wanted = self.in_flight(ticket) if wanted is None else set(wanted)
        got: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._waiter.pull(self.grid, list(self._flight)):
                msg_id = reply.metadata.reply_to_message_id
                self._done[msg_id] = self._split(reply)
            for msg_id in ids & set(self._done):
                got.update(self._done.pop(msg_id))
            if wanted <= set(got) or not ids & set(self._flight):
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            if self.abort is not None and self.abort():
                raise RunError("stopped at once while waiting for client replies")
            self._waiter.wait(min(left, 1.0))

    def exchange(
        self, contents: Mapping[int, RecordDict], msg_type: str, *, timeout: float, reduce: int = 0
    ) -> dict[int, Message]:
        """Send and wait: one reply per client that answered before ``timeout``."""
        ticket = self.push(contents, msg_type, reduce=reduce)
        got = self.pull(ticket, timeout=timeout)
        self.forget(ticket)
        return got

    def forget(self, ticket: list[str]) -> None:
        """Stop waiting for the replies of ``ticket`` (timed out, or no longer needed)."""
        for msg_id in ticket:
            self._flight.pop(msg_id, None)
            self._done.pop(msg_id, None)

    def _split(self, reply: Message) -> dict[int, Message]:
        """Per-client replies of one Flower reply (a pack's or a single client's)."""
        cids, templates, packed = self._flight.pop(reply.metadata.reply_to_message_id)
        if reply.has_error():
            return {c: Message(reply.error, reply_to=templates[c]) for c in cids}
        if not packed:
            (cid,) = cids
            return {cid: Message(reply.content, reply_to=templates[cid])}
        errors = reply.content.get(PACK_ERRORS_KEY, ConfigRecord())
        if is_reduced(reply.content):
            parts, sums = split_reduced(reply.content)
            self._sums.update(sums)
        else:
            parts = unpack_content(reply.content)
        out = {}
        for cid in cids:
            if f"c{cid}" in errors:
                error = Error(code=CLIENT_ERROR_CODE, reason=str(errors[f"c{cid}"]))
                out[cid] = Message(error, reply_to=templates[cid])
            else:
                out[cid] = Message(parts[cid], reply_to=templates[cid])
        return out
