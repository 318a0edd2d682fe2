"""The run-directory lock: one fedopt process at a time writes a run directory.

``run``, ``resume`` and ``report`` hold an exclusive ``flock`` on
``<run_dir>/.lock`` while they write, so a second process pointed at the same
directory is refused in one line (naming the PID that holds it) instead of
interleaving rounds into the same ``metrics.jsonl``. The kernel drops a flock
when its process dies, SIGKILL included, so a killed run never leaves a stale
lock behind. The lock is re-entrant within a process (a resume that then runs
the batch takes it once).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedopt.errors import ConfigError

__all__ = ["LOCK_FILE", "run_lock"]

LOCK_FILE = ".lock"

#: Locks this process holds: resolved run directory -> (file descriptor, depth).
_HELD: dict[Path, tuple[int, int]] = {}


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (PID {text} holds it)" if text.isdigit() else ""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` for the ``with`` block.

    Raises
    ------
    ConfigError
        Another process holds the lock (``run_dir`` is being written).
    """
    key = Path(run_dir).expanduser().resolve()
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield key
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(
            "run_dir", str(key), f"a run directory no other fedopt process is writing{holder}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = (fd, 1)
    try:
        yield key
    finally:
        os.close(_HELD.pop(key)[0])  # closing the descriptor releases the flock
