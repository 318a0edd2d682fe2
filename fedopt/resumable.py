"""What a server loop puts in a checkpoint, and how a resumed loop gets it all back.

A checkpoint (written by :func:`fedopt.checkpoint.save_checkpoint`) holds:

- the driver's own state: every attribute of the server loop except what is
  rebuilt from the scenario (task, transport, callbacks). That is the global
  model, the strategy object whole (server momentum, FedHyper's rates,
  FedKSeed's accumulators and history, FedSVD's factors, the DP wrapper's
  accountant), the virtual clock, the asynchronous timeline with its
  versions and the updates that arrived but are not applied yet, the
  decentralized relay's models, the byte and metric counters, and where
  the loop stands (the driver's ``loop`` attribute);
- every client's ``Context.state`` (DP accountants, curriculum state, node
  models, FedKSeed's replay state), exported by the clients themselves
  through ``query`` messages (:func:`export_clients`), since the server
  cannot read client memory, and imported the same way on resume; the
  records are keyed by client, so a resumed run may pack its clients
  differently;
- the server process's random generators (Python, NumPy, torch);
- the rows written so far, the scenario and its fingerprint;
- the run's secret noise key when ``noise = "secret"``
  (:mod:`fedopt.privacy.secrecy`): the only place it is written, so that a
  resumed run draws exactly the noise the uninterrupted one would have. A
  checkpoint is therefore as private as the training data.

Checkpoint traffic is the simulator's, not the simulated protocol's: it is
not counted in any byte metric.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedopt.checkpoint import save_checkpoint
from fedopt.errors import RunError, RunInterrupted

__all__ = [
    "Checkpointer",
    "STATE_ACTION",
    "capture",
    "client_state_mod",
    "export_clients",
    "import_clients",
    "restore",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger("fedopt")

#: ConfigRecord key of a ``query`` message that exports or imports a client's state.
STATE_ACTION = "fedopt-state"
#: Driver attributes rebuilt from the scenario rather than saved.
TRANSIENT = frozenset(
    {
        "task",
        "scenario",
        "emit",
        "transport",
        "layout",
        "test",
        "bytes",
        "run_key",
        "node_patience",
        "checkpointer",
        "stop",
        "restored",
        "noise_key",
    }
)


def rng_state() -> dict[str, Any]:
    """The server process's global random generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def capture(driver: Any) -> bytes:
    """The driver's state: its attributes except :data:`TRANSIENT` ones, serialised.

    cloudpickle rather than pickle: strategies hold what plain pickle refuses
    (read-only mappings of frozen parameters, functions defined in a factory).
    One call serialises everything, so objects shared between the strategy
    and the driver (the server model a strategy is bound to) stay shared.
    """
    return cloudpickle.dumps({k: v for k, v in vars(driver).items() if k not in TRANSIENT})


def restore(driver: Any, state: bytes) -> None:
    """Put a captured state back into a freshly built driver."""
    vars(driver).update(cloudpickle.loads(state))


# -- client state, through messages ------------------------------------------------------------
def _prefix(run_key: str, cid: int) -> str:
    return f"{run_key}/client{cid}/"


def client_state_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Client mod answering the server's state ``query`` messages; passes everything else on.

    ``export`` replies with every record the client keeps in the node's
    ``Context.state`` (named without the run and client prefix); ``import``
    stores the records it carries.
    """
    config = msg.content.get("config")
    if msg.metadata.message_type != MessageType.QUERY or config is None:
        return call_next(msg, context)
    action = config.get(STATE_ACTION)
    if action is None:
        return call_next(msg, context)
    prefix = _prefix(str(config.get("run-key", "")), int(config["cid"]))
    out = RecordDict()
    if action == "export":
        for key, record in context.state.items():
            if key.startswith(prefix):
                out[key[len(prefix) :]] = record
    elif action == "import":
        for key, record in msg.content.items():
            if key != "config":
                context.state[prefix + key] = record
    else:
        raise ValueError(f"unknown {STATE_ACTION} action {action!r}; known: export, import")
    return Message(out, reply_to=msg)


def _state_exchange(
    driver: Any, contents: dict[int, RecordDict], action: str
) -> dict[int, RecordDict]:
    for cid, content in contents.items():
        config = ConfigRecord({STATE_ACTION: action, "cid": cid})
        if driver.run_key:
            config["run-key"] = driver.run_key
        content["config"] = config
    replies = driver.transport.exchange(
        contents, MessageType.QUERY, timeout=driver.scenario.run.timeout
    )
    failed = {
        c: (r.error.reason if r.has_error() else "") for c, r in replies.items() if r.has_error()
    }
    failed.update({c: "no reply" for c in set(contents) - set(replies)})
    if failed:
        raise RunError(f"client state {action} failed for clients {sorted(failed)}: {failed}")
    return {cid: replies[cid].content for cid in sorted(replies)}


def export_clients(driver: Any) -> dict[int, RecordDict]:
    """The ``Context.state`` records of every client that holds any, by client id.

    Only clients the run has sent a message to (trained, evaluated, queried or
    given back their state on resume) can hold state, so only they are asked:
    a checkpoint costs what the run has touched, not the population.
    """
    cids = sorted(driver.transport.contacted)
    states = _state_exchange(driver, {cid: RecordDict() for cid in cids}, "export")
    return {cid: records for cid, records in states.items() if records}


def import_clients(driver: Any, states: dict[int, RecordDict]) -> None:
    """Give every client back the records :func:`export_clients` saved."""
    contents = {
        cid: RecordDict(dict(records.items())) for cid, records in states.items() if records
    }
    if contents:
        _state_exchange(driver, contents, "import")


#: Share of a run's time that ``checkpoint_every = "auto"`` lets checkpoints take.
AUTO_SHARE = 0.05


class Cadence:
    """When ``checkpoint_every = "auto"`` writes: after round 1, then every k rounds.

    k is the fewest rounds whose time covers the last checkpoint's cost
    ``AUTO_SHARE`` times over: ``ceil(cost / (share * round))``, the round
    time being the median of the rounds since the last checkpoint. It is
    re-measured at every checkpoint (a checkpoint holds every row so far, so
    its cost grows with the run). Timing decides only when checkpoints are
    written, never what a run computes: resuming from any of them gives the
    uninterrupted rows.
    """

    def __init__(self, *, share: float = AUTO_SHARE) -> None:
        self.share = share
        self.next_round = 1
        self._round_start: float | None = None
        self._rounds: list[float] = []
        self._ticked: int | None = None

    def tick(self, round_: int) -> None:
        """Round ``round_`` ended now (asking again about the same round changes nothing)."""
        if round_ == self._ticked:
            return
        self._ticked = round_
        now = time.monotonic()
        if self._round_start is not None:
            self._rounds.append(now - self._round_start)
        self._round_start = now

    def due(self, round_: int) -> bool:
        """Whether the cadence asks for a checkpoint after ``round_``."""
        return round_ >= self.next_round

    def wrote(self, round_: int, cost: float) -> None:
        """A checkpoint after ``round_`` took ``cost`` seconds: plan the next one."""
        per_round = statistics.median(self._rounds) if self._rounds else 0.0
        every = math.ceil(cost / (self.share * per_round)) if per_round > 0 else 1
        self.next_round = round_ + max(1, every)
        self._rounds = []
        self._round_start = time.monotonic()  # the checkpoint's own time is not a round's


class Checkpointer:
    """Writes a run's checkpoints and turns a stop request into a clean stop.

    Parameters
    ----------
    run_dir : Path
        The run directory (checkpoints go to its ``checkpoints/`` folder).
    rows : list
        The rows emitted so far (the same list the run appends to).
    stop : StopRequest, optional
        Set by Ctrl-C / SIGTERM (:func:`fedopt.checkpoint.stop_on_signals`).
    """

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], *, stop: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.rows = rows
        self.stop = stop
        self.cadence = Cadence()

    def save(self, driver: Any, round_: int) -> Path:
        """Write the checkpoint of ``driver`` after ``round_``."""
        started = time.monotonic()
        s = driver.scenario
        payload = {
            "format": 1,
            "round": round_,
            "fingerprint": s.fingerprint(),
            "scenario": s.to_dict(),
            "rows": list(self.rows),
            "rng": rng_state(),
            "driver": capture(driver),
            "clients": export_clients(driver),
        }
        if driver.noise_key is not None:  # the checkpoint is as private as the data it resumes
            payload["noise_key"] = driver.noise_key.to_bytes()
        path = save_checkpoint(self.run_dir, payload, round_=round_)
        cost = time.monotonic() - started
        self.cadence.wrote(round_, cost)
        log.info("checkpoint after round %d in %.3f s: %s", round_, cost, path)
        return path

    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self.stop is not None and self.stop.is_set()

    def due(self, scenario: Any, round_: int, *, last: bool) -> bool:
        """Whether a checkpoint is written after ``round_``: on the cadence or on a stop."""
        every = scenario.run.checkpoint_every
        if every == "auto":
            self.cadence.tick(round_)
            return not last and (self.stopping() or self.cadence.due(round_))
        return not last and (self.stopping() or bool(every and round_ % every == 0))

    def after_round(self, driver: Any, round_: int, *, last: bool) -> None:
        """Checkpoint every ``run.checkpoint_every`` rounds, or now if a stop was asked for.

        Raises
        ------
        RunInterrupted
            A stop was requested: the checkpoint is written and the run ends here.
        """
        if self.due(driver.scenario, round_, last=last):
            self.save(driver, round_)
            if self.stopping():
                raise RunInterrupted(round_, self.run_dir, self.stop.signal_name)

    def aborting(self) -> bool:
        """True once a second signal asked to stop at once (waits give up)."""
        return self.stop is not None and self.stop.is_hard()
