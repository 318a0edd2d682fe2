"""Event-driven message flow in Flower's simulation engine: no polling latency per round.

Flower 1.41's simulation moves messages with two polling loops: the engine's
dispatcher sweeps every node for new messages and then sleeps 0.1 s
(``vce_api.add_messages_to_queue``), and ``InMemoryGrid.send_and_receive``
sleeps its 0.1 s ``pull_interval`` between pulls. A round therefore costs
at least ~0.2 s whatever the work, and the dispatcher's sweep asks the link
state for every node's messages, a scan of every stored message per node.

Both ends watch the same in-memory link state, so this module hangs a
:class:`Hub` on it that wraps the state's two store methods: storing an
instruction wakes the dispatcher (which then asks only the nodes that got
one), storing a reply wakes whoever waits for replies. The replacement
dispatcher (:func:`dispatch_messages`, installed by :func:`install` for
fedopt's own simulations) also hands a node its next message only after its
previous reply is stored, so a node's ``Context`` is never updated by two
workers at once. Everything else (validation, delivery marks, TTLs, the
worker threads and the Ray backend) is Flower's code. A grid without an
in-memory state (a deployed SuperLink under ``flwr run``) is polled every 5 ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from queue import Queue
from typing import Any

__all__ = ["Hub", "dispatch_messages", "hub_of", "install", "reply_waiter"]

#: Poll interval for grids fedopt cannot watch (seconds).
POLL = 0.005


class Hub:
    """Wakes the engine's dispatcher and the server's waits when the link state changes."""

    def __init__(self, state: Any) -> None:
        self.cond = threading.Condition()
        self.pending: set[int] = set()  # nodes that were sent a message not yet dispatched
        self.busy: set[int] = set()  # nodes whose dispatched message has no reply yet
        self.replies = 0
        store_ins, store_res = state.store_message_ins, state.store_message_res

        def store_message_ins(message: Any) -> Any:
            out = store_ins(message)
            if out:
                with self.cond:
                    self.pending.add(message.metadata.dst_node_id)
                    self.cond.notify_all()
            return out

        def store_message_res(message: Any) -> Any:
            out = store_res(message)
            with self.cond:
                self.busy.discard(message.metadata.src_node_id)
                self.replies += 1
                self.cond.notify_all()
            return out

        state.store_message_ins = store_message_ins
        state.store_message_res = store_message_res


_HUB_LOCK = threading.Lock()


def hub_of(state: Any) -> Hub:
    """The hub watching ``state`` (created on first use)."""
    with _HUB_LOCK:
        hub = state.__dict__.get("_fedopt_hub")
        if hub is None:
            hub = state.__dict__["_fedopt_hub"] = Hub(state)
        return hub


class _Waiter:
    """Pulls replies from a grid and blocks until the next one may have arrived."""

    def __init__(self, hub: Hub | None) -> None:
        self.hub = hub
        self._seen = hub.replies if hub is not None else 0

    def pull(self, grid: Any, message_ids: list[str]) -> Iterable[Any]:
        if self.hub is not None:
            with self.hub.cond:
                self._seen = self.hub.replies
        return grid.pull_messages(message_ids) if message_ids else []

    def wait(self, timeout: float) -> None:
        if self.hub is None:
            time.sleep(min(POLL, timeout))
            return
        with self.hub.cond:
            self.hub.cond.wait_for(lambda: self.hub.replies != self._seen, timeout=timeout)


def reply_waiter(grid: Any) -> _Waiter:
    """A waiter for ``grid``: event-driven on Flower's in-memory grid, else polling."""
    state = getattr(grid, "state", None)
    watchable = state is not None and hasattr(state, "store_message_res")
    return _Waiter(hub_of(state) if watchable else None)


def dispatch_messages(
    state: Any, queue: Queue[Any], nodes_mapping: Any, f_stop: threading.Event
) -> None:
    """Drop-in for Flower's ``add_messages_to_queue``: woken by new messages, no sweeps.

    A node gets its next message once its previous one has been answered.
    """
    hub = hub_of(state)
    while not f_stop.is_set():
        with hub.cond:
            ready = hub.pending - hub.busy
            if not ready:
                hub.cond.wait(timeout=0.5)
                continue
        for node_id in sorted(ready):
            messages = state.get_message_ins(node_id=node_id, limit=1)
            with hub.cond:
                if messages:
                    hub.busy.add(node_id)
                else:
                    hub.pending.discard(node_id)
            for msg in messages:
                queue.put(msg)


def install() -> None:
    """Make Flower's simulation engine (in this process) use :func:`dispatch_messages`."""
    from flwr.server.superlink.fleet.vce import vce_api

    vce_api.add_messages_to_queue = dispatch_messages
