"""Exception types that fedopt raises for bad input and failed runs."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigError",
    "DivergenceError",
    "FedoptError",
    "RunError",
    "RunInterrupted",
    "StorageError",
    "did_you_mean",
    "is_storage_fault",
]


class FedoptError(Exception):
    """Base class of every error fedopt raises on purpose."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _show(value: Any) -> str:
    """``repr(value)``, or a placeholder for what Python will not print (a 5000-digit integer)."""
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to print>"


class ConfigError(FedoptError, ValueError):
    """A scenario value, file or command-line input that cannot be used.

    Parameters
    ----------
    key : str
        Dotted name of the offending setting, e.g. ``"partition.alpha"``.
    value : Any
        The value that was given.
    allowed : str
        What would have been accepted, in words.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        text = str(key)  # shown quoted when empty, padded or not printable: one line, always
        shown = text if text and text.isprintable() and text == text.strip() else repr(text)
        super().__init__(f"{shown} = {_show(value)} is not allowed: {allowed}")


class RunError(FedoptError, RuntimeError):
    """A run that had to stop (too few replies, a crashed server step)."""


class DivergenceError(RunError):
    """Training produced NaN or inf, or a loss that blew up; names the round and the clients.

    ``detail`` replaces the default "non-finite ``where``" explanation (the
    blow-up rule of :mod:`fedopt.divergence` says what it measured).
    """

    def __init__(
        self, round_: int, where: str, clients: Iterable[int] = (), *, detail: str | None = None
    ) -> None:
        self.round = round_
        self.clients = sorted(clients)
        who = f" (clients {self.clients})" if self.clients else ""
        why = detail if detail is not None else f"non-finite {where}{who}"
        super().__init__(f"training diverged in round {round_}: {why}")


#: errno values of a file system that cannot take more of a run's files.
_STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG")
    if hasattr(errno, name)
)


def is_storage_fault(err: BaseException) -> bool:
    """True for an OSError of a full, read-only or failing file system."""
    return isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS


class StorageError(RunError):
    """Writing a run's files failed (disk full, read-only, I/O error); what was written is kept.

    Parameters
    ----------
    run_dir : path
        The run directory being written.
    err : OSError
        The failed write.
    """

    def __init__(self, run_dir: Any, err: OSError) -> None:
        self.run_dir = run_dir
        self.cause = OSError(err.errno, err.strerror, err.filename)
        where = err.filename or run_dir
        super().__init__(
            f"writing {where} failed: {err.strerror or err}; the rows written before are kept "
            f"in {run_dir}/metrics.jsonl and the newest verified checkpoint under checkpoints/"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.run_dir, self.cause))


class RunInterrupted(RunError):  # noqa: N818 (a stop, not an error)
    """A run stopped on request (Ctrl-C, SIGTERM) after writing a checkpoint; it can be resumed.

    Parameters
    ----------
    round_ : int
        The last round that finished (the checkpoint's round).
    run_dir : path
        The run directory to give ``fedopt resume``.
    signal_name : str, optional
        The signal that asked for the stop (``"SIGTERM"``), if one did.
    """

    def __init__(self, round_: int, run_dir: Any, signal_name: str | None = None) -> None:
        self.round = round_
        self.run_dir = run_dir
        self.signal_name = signal_name
        by = f" by {signal_name}" if signal_name else ""
        super().__init__(
            f"stopped{by} after round {round_}; continue with: fedopt resume {run_dir}"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.round, self.run_dir, self.signal_name))
