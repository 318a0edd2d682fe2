"""A simulation's start-up: Ray and warm workers started while the task is built, and its timeline.

Before round 1 a run pays for its imports, ``ray.init``, the client workers
(each a Python process importing torch and fedopt) and the task (data,
partition, model). :func:`start_federation` overlaps them: the driver starts
Ray and asks for the pool's actors (:func:`fedopt.ray_backend.prestart`)
while a thread builds the tasks, then shares the built tasks with the
workers through Ray's object store, so no worker rebuilds one. Every step's
wall-clock time goes into a :class:`Startup` timeline, written to the run
directory as ``startup.json`` (what ``bench/cold_start.py`` reads).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import MutableSequence, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedopt import ray_backend

__all__ = ["STARTUP_FILE", "Startup", "process_start", "start_federation"]

#: The run directory's start-up timeline.
STARTUP_FILE = "startup.json"


def process_start() -> float | None:
    """Epoch seconds at which this process started (None where it cannot be read)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil, or no /proc: the timeline starts at `entered`
        return None


@dataclass(frozen=True)
class Startup:
    """Epoch seconds of each start-up step of one federation, first mark wins.

    Attributes
    ----------
    marks : dict
        ``{step: epoch seconds}``: ``process`` (the interpreter started),
        ``entered`` (fedopt's imports done, the run entered), ``ray`` (``ray.init``
        returned), ``actors_requested``, ``tasks`` (built on the driver),
        ``shared`` (in the object store), ``federation`` (the ServerApp runs),
        ``round_0``, ``round_1``, ... (each round's metrics row), and
        ``actors_warm`` (the last prestarted worker finished its imports).
    """

    marks: dict[str, float] = field(default_factory=dict)

    @classmethod
    def begin(cls) -> Startup:
        """A timeline starting with the process start and now."""
        clock = cls()
        start = process_start()
        if start is not None:
            clock.marks["process"] = start
        clock.mark("entered")
        return clock

    def mark(self, step: str, at: float | None = None) -> None:
        """Record ``step`` at ``at`` (default: now) unless it was recorded before."""
        self.marks.setdefault(step, time.time() if at is None else at)

    def seconds(self) -> dict[str, float]:
        """Each mark in seconds after the first one, in time order."""
        if not self.marks:
            return {}
        t0 = min(self.marks.values())
        return {k: round(v - t0, 4) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}

    def write(self, run_dir: Path) -> None:
        """Write the timeline to ``run_dir/startup.json`` (best effort: never fails a run)."""
        with contextlib.suppress(OSError):  # a full disk is reported by the run's own writers
            Path(run_dir, STARTUP_FILE).write_text(
                json.dumps({"epoch": self.marks, "seconds": self.seconds()}, indent=1)
            )


def _build_all(scenarios: Sequence[Any], tasks: Sequence[Any]) -> list[Any]:
    from fedopt.task import build_task

    return [t if t is not None else build_task(sc) for sc, t in zip(scenarios, tasks, strict=True)]


def start_federation(
    scenarios: Sequence[Any], tasks: MutableSequence[Any], clock: Startup
) -> ray_backend.Prestart:
    """Start Ray and its warm workers, build the missing tasks meanwhile, share them all.

    ``tasks`` holds each scenario's built task or None; the Nones are built
    (in a thread, while the main thread starts Ray, which must happen there
    for its signal handling) and filled in place. A task that fails to build
    stops Ray again and raises its error.
    """
    from fedopt.simulation import backend_config

    with ThreadPoolExecutor(1, thread_name_prefix="fedopt-task") as pool:
        pending = pool.submit(_build_all, scenarios, tasks)
        try:
            warm = ray_backend.prestart(backend_config(scenarios[0]))
        except BaseException:
            pending.cancel()
            raise
        clock.mark("ray", warm.ray_at)
        clock.mark("actors_requested", warm.actors_at)
        try:
            tasks[:] = pending.result()
        except BaseException:
            warm.close()
            raise
    clock.mark("tasks")
    warm.share({sc.fingerprint(): t for sc, t in zip(scenarios, tasks, strict=True)})
    clock.mark("shared")
    return warm
