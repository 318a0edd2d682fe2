"""A watchdog process that removes the driver's Ray processes once the driver is gone.

Ray ties its GCS and raylet to the driver (the kernel kills them when it
dies), but the dashboard and runtime-env agents it forks wait on a GCS that
is gone and outlive a driver killed by SIGKILL. :func:`ensure` starts one
small process per driver (in a session of its own, so signals to the
driver's group do not reach it) that every half second records the driver's
Ray descendants and, when the driver has exited for any reason, kills those
still alive (matched by PID and start time, so a reused PID is never hit),
then exits. Only processes that are Ray's (``raylet``, ``gcs_server``,
``ray::...``, a Python running a module of the ``ray`` package) are touched.

Run as ``python -m fedopt.watchdog DRIVER_PID``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["ensure", "is_ray_process", "watch"]

_STARTED: dict[int, subprocess.Popen] = {}


def is_ray_process(name: str, cmdline: list[str]) -> bool:
    """Whether a process is one of Ray's, by its name or the program it runs."""
    if name in ("raylet", "gcs_server") or name.startswith("ray::"):
        return True
    return "/ray/" in " ".join(cmdline[:3])  # python [-u] .../site-packages/ray/...


def _snapshot(driver: object, known: dict[int, float]) -> None:
    import psutil

    try:
        kids = driver.children(recursive=True)  # type: ignore[attr-defined]
    except psutil.Error:
        return
    for kid in kids:
        try:
            if is_ray_process(kid.name(), kid.cmdline()):
                known.setdefault(kid.pid, kid.create_time())
        except psutil.Error:
            continue


def _kill(known: dict[int, float]) -> int:
    import psutil

    killed = 0
    for pid, started in known.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 1e-3:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def watch(driver_pid: int, *, interval: float = 0.5) -> int:
    """Record ``driver_pid``'s Ray descendants until it exits, then kill them; return how many."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return 0
    known: dict[int, float] = {}
    while True:
        try:
            alive = driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            return _kill(known)
        _snapshot(driver, known)
        time.sleep(interval)


def ensure() -> subprocess.Popen | None:
    """Start this process's watchdog once (a no-op where it already runs or cannot start)."""
    pid = os.getpid()
    if pid in _STARTED or sys.platform == "win32":
        return _STARTED.get(pid)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedopt.watchdog", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return None
    _STARTED[pid] = proc
    return proc


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
