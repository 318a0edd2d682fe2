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

Start-up is cut the same way (:func:`prestart`): fedopt starts Ray itself
with a minimal ``ray.init`` (no dashboard, no log forwarding, no runtime
environment for a local cluster) and creates the pool's actors at once, each
importing torch and fedopt while the driver builds the task; the driver then
puts each built task in Ray's object store (:meth:`Prestart.share`), so a
worker adopts it (:func:`shared_task`) instead of rebuilding it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Prestart",
    "install",
    "prestart",
    "resilient_backend",
    "separate_process_groups",
    "shared_task",
]

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
            from flwr.simulation.ray_transport.ray_actor import BasicActorPool

            self.pool = BasicActorPool(
                actor_type=_warm_actor_class(),
                client_resources=self.client_resources,
                actor_kwargs=self.actor_kwargs,
            )
            self.pool.__class__ = _pool_class(BasicActorPool)
            res = self.client_resources
            self.pool.create_actor_fn = lambda: _take_prestarted(res) or _new_actor(res)
            self.pool.add_actors_to_pool(self.pool.actors_capacity)
            self.app_fn = app_fn
            log.debug("actor pool: %d actors", self.pool.num_actors)

    return ResilientRayBackend


#: Warm actors started before the engine, by their resources, not yet in a pool (driver side).
_PRESTARTED: dict[tuple, list[Any]] = {}
#: Object-store references of the tasks the driver shared, by scenario fingerprint (driver side).
_SHARED_REFS: dict[str, Any] = {}
#: The tasks this worker adopted, by scenario fingerprint (worker side).
_ADOPTED: dict[str, Any] = {}


def _resource_key(resources: Mapping[str, float]) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in resources.items()))


def _take_prestarted(resources: Mapping[str, float]) -> Any:
    waiting = _PRESTARTED.get(_resource_key(resources))
    return waiting.pop() if waiting else None


def _new_actor(resources: Mapping[str, float]) -> Any:
    return _warm_actor_class().options(**resources).remote(tasks=dict(_SHARED_REFS))


def warm_worker() -> None:
    """Import what a client worker needs before its first message (torch, fedopt's client)."""
    import torch  # noqa: F401

    import fedopt.clientapp  # noqa: F401
    from fedopt.registry import load_builtins

    load_builtins()


def adopt(tasks: Mapping[str, Any]) -> None:
    """Keep the tasks the driver shared (object-store references or tasks) in this worker."""
    import ray

    for key, ref in tasks.items():
        if key not in _ADOPTED:
            _ADOPTED[key] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def shared_task(scenario: Any) -> Any:
    """The task the driver built for ``scenario`` and shared with this worker, or None.

    It is the driver's task, unpickled from the object store, with the
    worker's own (equal) scenario object; None where nothing was shared for
    this scenario (``flwr run``, a scenario the driver did not build).
    """
    task = _ADOPTED.get(scenario.fingerprint())
    return None if task is None else dataclasses.replace(task, scenario=scenario)


@functools.cache
def _warm_actor_class() -> Any:
    """Flower's client actor that imports torch and fedopt when it starts, and adopts tasks."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    class WarmClientAppActor(VirtualClientEngineActor):
        def __init__(self, on_actor_init_fn: Any = None, tasks: Any = None) -> None:
            super().__init__()
            if on_actor_init_fn:
                on_actor_init_fn()
            from fedopt import ray_backend  # the worker's module, not a pickled copy

            ray_backend.warm_worker()
            ray_backend.adopt(tasks or {})
            self.warm_at = time.time()

        def adopt(self, tasks: Any) -> float:
            from fedopt import ray_backend

            ray_backend.adopt(tasks)
            return time.time()

        def ready(self) -> float:
            return self.warm_at

        def adopted(self) -> list[str]:
            from fedopt import ray_backend

            return sorted(ray_backend._ADOPTED)

    return ray.remote(WarmClientAppActor)


@dataclasses.dataclass
class Prestart:
    """Ray started and the first warm actors on their way, before Flower's engine starts.

    Attributes
    ----------
    started_ray : bool
        Whether this process started (and so must stop) Ray.
    actors : list
        The warm actors created for the pool.
    ray_at, actors_at : float
        Epoch seconds when ``ray.init`` returned and when the actors were requested.
    """

    started_ray: bool
    actors: list[Any]
    ray_at: float
    actors_at: float

    def share(self, tasks: Mapping[str, Any]) -> None:
        """Put ``{fingerprint: task}`` in the object store and hand it to every actor.

        Actors started later (a replacement for a dead one) get it when created.
        """
        import ray

        refs = {key: ray.put(task) for key, task in tasks.items() if key not in _SHARED_REFS}
        _SHARED_REFS.update(refs)
        if refs:
            for actor in self.actors:
                actor.adopt.remote(refs)  # an actor runs its calls in order: before any message

    def ready_times(self, *, timeout: float = 5.0) -> list[float]:
        """Epoch seconds at which each prestarted actor finished warming up (best effort)."""
        import ray

        try:
            return list(ray.get([a.ready.remote() for a in self.actors], timeout=timeout))
        except Exception:  # an actor gone or the engine stopped: no timing, no failure
            return []

    def close(self) -> None:
        """Forget the actors and tasks; stop Ray when this process started it and it still runs."""
        import ray

        _PRESTARTED.clear()
        _SHARED_REFS.clear()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


def init_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """``ray.init`` arguments for a backend config: Flower's, minus what a local run never uses.

    A local cluster's processes inherit this process's environment, so
    ``PYTHONPATH`` needs no runtime environment (which costs Ray's agent a
    set-up per worker); a remote cluster (``address``) gets the one Flower gives it.
    """
    args: dict[str, Any] = {"include_dashboard": False, **config.get("init_args", {})}
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.get("address"):
        args.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": path}})
    else:
        os.environ["PYTHONPATH"] = path
    return args


def prestart(config: Mapping[str, Any]) -> Prestart:
    """Start Ray (unless it runs) and, without waiting, the pool's warm actors.

    ``config`` is Flower's backend config (``client_resources``, ``init_args``).
    Call :func:`install` first, so that Ray's processes start in their own
    process groups.
    """
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    started = not ray.is_initialized()
    if started:
        ray.init(**init_args(config))
    ray_at = time.time()
    resources = dict(config.get("client_resources") or {"num_cpus": 2, "num_gpus": 0.0})
    actors = [_new_actor(resources) for _ in range(pool_size_from_resources(resources))]
    _PRESTARTED[_resource_key(resources)] = list(actors)
    return Prestart(started, actors, ray_at, time.time())


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
