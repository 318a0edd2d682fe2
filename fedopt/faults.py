"""Fault injection (``[faults]``): clients that raise, and workers that die, on purpose.

Long runs meet failing clients; a scenario can make them happen, reproducibly,
to check that the run survives them: each selected client of a training round
draws one uniform number from a generator seeded by (run seed, faults seed,
round, client), and raises with probability ``client_error`` or kills its
whole worker process with probability ``worker_crash``. The server drops such
a client from the round with the reason in its log and the row's
``failed_clients``, and goes on while ``run.min_replies`` replies came back.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.records import CID_KEY
from fedopt.registry import CLIENT_MODS, SECTIONS

__all__ = ["FaultParams", "InjectedFaultError", "fault_draw", "fault_mods"]

log = logging.getLogger(__name__)

#: Exit status of a worker killed by ``worker_crash``.
CRASH_STATUS = 86


class InjectedFaultError(RuntimeError):
    """The exception a client raises when ``[faults]`` says it fails this round."""


@dataclass(frozen=True)
class FaultParams:
    """Injected failures of selected clients in training rounds.

    Attributes
    ----------
    client_error : float
        Probability that a client raises instead of training.
    worker_crash : float
        Probability that a client kills the process it runs in (a Ray worker:
        every virtual client it hosts loses its in-memory state). Outside a Ray
        worker (in-process tests) the client raises instead.
    seed : int
        Mixed with the run's seed, so the same run can fail differently.
    """

    client_error: float = 0.0
    worker_crash: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("client_error", "worker_crash"):
            p = getattr(self, key)
            check(0.0 <= p <= 1.0 and math.isfinite(p), key, p, "a probability in [0, 1]")
        total = self.client_error + self.worker_crash
        if total > 1.0:
            raise ConfigError(
                "worker_crash", self.worker_crash, f"at most 1 - client_error ({total} > 1)"
            )


def fault_draw(run_seed: int, params: FaultParams, server_round: int, cid: int) -> str | None:
    """``"error"``, ``"crash"`` or None: what happens to ``cid`` in ``server_round``."""
    u = np.random.default_rng([int(run_seed), params.seed, server_round, cid, 0xFA17]).random()
    if u < params.client_error:
        return "error"
    if u < params.client_error + params.worker_crash:
        return "crash"
    return None


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # no Ray, or no runtime context here
        return False


def fault_mods(scenario: Any) -> list[Callable[..., Message]]:
    """The Flower mod that injects ``[faults]`` into training messages (none without it)."""
    params = scenario.extras.get("faults")
    if params is None or params.client_error + params.worker_crash == 0.0:
        return []
    seed = scenario.run.seed

    def inject(msg: Message, context: Context, call_next: Any) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            config = msg.content["config"]
            cid, server_round = int(config[CID_KEY]), int(config.get("server-round", 0))
            what = fault_draw(seed, params, server_round, cid)
            if what == "crash" and _in_ray_worker():
                log.error("injected: client %d kills its worker in round %d", cid, server_round)
                os._exit(CRASH_STATUS)
            if what is not None:
                raise InjectedFaultError(f"injected {what}: client {cid} in round {server_round}")
        return call_next(msg, context)

    return [inject]


SECTIONS.register("faults", FaultParams)
CLIENT_MODS.register("faults", fault_mods)
