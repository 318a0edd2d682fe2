"""Flower's Ray simulation backend with one repair: a Ray worker that dies is replaced.

Flower 1.41's ``RayBackend`` hands the actor of a failed message back to its
pool whatever the failure, so after a worker process dies (out of memory, a
segfault, ``[faults] worker_crash``) every later message routed to that dead
actor fails too, and the federation shrinks round after round. Flower has no
setting for this, so fedopt swaps in a subclass (:func:`resilient_backend`) for its own
simulations: the message in flight still fails (the server drops that client
from the round and logs why), but a fresh actor with the same resources takes
the dead one's place. Nodes keep their ``Context`` (the engine holds it, not
the actor), so only the failed message's work is lost. Everything else is
Flower's code, unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["install", "resilient_backend"]

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


def install() -> None:
    """Make Flower's simulation engine (in this process) build the resilient backend."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    raybackend.RayBackend = resilient_backend()
