"""Flower's Ray simulation backend, repaired: dead workers replaced, Ray kept off our signals.

Flower 1.41's ``RayBackend`` hands the actor of a failed message back to its
pool whatever the failure, so after a worker process dies (out of memory, a
segfault, ``[faults] worker_crash``) every later message routed to that dead
actor fails too, and the federation shrinks round after round. Flower has no
setting for this, so fedopt swaps in a subclass (:func:`resilient_backend`) for its own
simulations: the message in flight still fails (the server drops that client
from the round and logs why), but a fresh actor with the same resources takes
the dead one's place. Nodes keep their ``Context`` (the engine holds it, not
the actor), so only the failed message's work is lost. Ray's own processes
are started in process groups of their own (:func:`separate_process_groups`),
so a signal to the driver's whole group does not kill the workers before the
round can finish. Everything else is Flower's and Ray's code, unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["install", "resilient_backend", "separate_process_groups"]

log = logging.getLogger(__name__)


@functools.cache
def _pool_class(base: type) -> type:
    """A subclass of Flower's actor pool ``base`` that replaces actors that died."""
    import ray

    class ResilientActorPool(base):  # type: ignore[misc, valid-type]
        def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:
            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except ray.exceptions.RayActorError:
                self._future_to_actor.pop(future, None)
                self.pool.append(self.create_actor_fn())
                log.warning("a Ray worker died; a new one replaces it")
                raise

        def add_actor_back_to_pool(self, future: Any) -> None:
            actor = self._future_to_actor.pop(future, None)
            if actor is not None:  # None: it died and was replaced above
                self.pool.append(actor)

    return ResilientActorPool


@functools.lru_cache(maxsize=1)
def resilient_backend() -> type:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    class ResilientRayBackend(RayBackend):
        """Flower's ``RayBackend`` whose actor pool replaces dead actors."""

        def build(self, app_fn: Any) -> None:
            super().build(app_fn)  # creates the pool
            self.pool.__class__ = _pool_class(type(self.pool))

    return ResilientRayBackend


@functools.cache
def _grouped_popen(base: type) -> type:
    """Ray's process launcher ``base`` starting each Ray process in a process group of its own."""

    class GroupedPopen(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    return GroupedPopen


def separate_process_groups() -> bool:
    """Start Ray's processes (GCS, raylet and the workers it forks) outside our process group.

    A SIGTERM or SIGINT sent to the whole process group (``timeout``, SLURM,
    systemd, Ctrl-C at a terminal) then reaches the driver only, which finishes
    its round and checkpoints while the workers live on. Ray does the same on
    Windows; on Linux it is safe where Ray has kernel fate-sharing (its
    processes die with their parent through PR_SET_PDEATHSIG, not through the
    group). Returns whether the launcher was changed.
    """
    import sys

    import ray._private.services as services
    import ray._private.utils as ray_utils

    if sys.platform == "win32" or not ray_utils.detect_fate_sharing_support():
        return False
    if not getattr(services.ConsolePopen, "_fedopt_grouped", False):
        grouped = _grouped_popen(services.ConsolePopen)
        grouped._fedopt_grouped = True
        services.ConsolePopen = grouped
    return True


def install() -> None:
    """Make Flower's simulation engine (in this process) build the resilient backend.

    Ray's processes are also started outside this process's group
    (:func:`separate_process_groups`).
    """
    from flwr.server.superlink.fleet.vce.backend import raybackend

    raybackend.RayBackend = resilient_backend()
    separate_process_groups()
