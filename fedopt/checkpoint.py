"""Atomic, verified checkpoint files of a run, and the stop request that triggers one.

A checkpoint is ``<run_dir>/checkpoints/round-000012.ckpt``: a fixed header,
then the body, the payload pickled with protocol 5. The header
(:data:`HEADER`, little-endian) holds

======  =======  ===============================================
bytes   field    value
======  =======  ===============================================
0-7     magic    ``b"FEDOPTCK"``
8-11    version  :data:`FORMAT_VERSION` (uint32)
12-19   round    the round the checkpoint was taken after (uint64)
20-27   length   the body's length in bytes (uint64)
28-59   sha256   the SHA-256 digest of the body
======  =======  ===============================================

A file whose magic, version, length or digest does not match is torn or
corrupt and is never loaded. Files are written to a temporary name in the same
folder, fsynced, renamed over their final name with ``os.replace`` and the
folder is fsynced, so a crash leaves either the old set of checkpoints or the
new one, never a partial file under a checkpoint's name.

The body is a pickle rather than ``torch.save``: a payload holds Flower
records, numpy arrays, RNG states and arbitrary strategy objects, which
``torch.load`` only reads with ``weights_only=False``, i.e. as a pickle
anyway; plain pickle streams straight through the digest with no zip
container, and tensors pickle through torch's own reducers. Like any pickle, a
checkpoint runs code when loaded: load only run directories you created.

:func:`stop_on_signals` turns the first Ctrl-C or SIGTERM into a
:class:`StopRequest` (the run stops after its current round and writes a
checkpoint) and a second one into an immediate ``KeyboardInterrupt``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedopt.errors import RunError
from fedopt.params import check
from fedopt.report import atomic_file

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "Checkpoint",
    "StopRequest",
    "latest_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "stop_on_signals",
]

log = logging.getLogger("fedopt.checkpoint")

CHECKPOINT_DIR = "checkpoints"
MAGIC = b"FEDOPTCK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIQQ32s")
_NAME = re.compile(r"round-(\d+)\.ckpt")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the round it was taken after, its file and its payload."""

    round: int
    path: Path
    payload: dict


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.fh.write(view)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _listing(folder: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file name in ``folder``, by round."""
    if not folder.is_dir():
        return []
    found = ((_NAME.fullmatch(p.name), p) for p in folder.iterdir())
    return sorted((int(m[1]), p) for m, p in found if m is not None and p.is_file())


def save_checkpoint(run_dir: Path, payload: dict, *, round_: int, keep: int = 2) -> Path:
    """Write ``payload`` as the checkpoint of round ``round_`` atomically; return its path.

    After the new file is durable, checkpoints of later rounds (left by a
    timeline that a resume is recomputing) and all but the newest ``keep``
    are deleted, as are temporary files of writes that never finished.
    An error while writing (an unpicklable object, a full disk) leaves the
    existing checkpoints untouched and no partial file behind.
    """
    check(isinstance(round_, int) and round_ >= 0, "round_", round_, "an integer >= 0")
    check(isinstance(keep, int) and keep >= 1, "keep", keep, "an integer >= 1")
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"round-{round_:06d}.ckpt"
    with atomic_file(final, "wb") as fh:
        fh.write(bytes(HEADER.size))  # a file cut short keeps a zero, invalid magic
        body = _HashingWriter(fh)
        pickle.dump(payload, body, protocol=5)
        fh.seek(0)
        fh.write(HEADER.pack(MAGIC, FORMAT_VERSION, round_, body.size, body.sha.digest()))
    _fsync_dir(folder)
    _prune(folder, round_, keep)
    return final


def _prune(folder: Path, round_: int, keep: int) -> None:
    entries = _listing(folder)
    older = [p for r, p in entries if r <= round_]
    doomed = [p for r, p in entries if r > round_] + older[: max(0, len(older) - keep)]
    doomed += list(folder.glob(".round-*.ckpt.*.tmp"))
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("could not delete old checkpoint %s: %s", path, err.strerror)


class _BadFileError(Exception):
    """A checkpoint file that does not verify (internal; becomes a RunError)."""


def _verify(fh: BinaryIO, path: Path) -> int:
    """Check the header and digest of an open checkpoint file; return its round."""
    head = fh.read(HEADER.size)
    if len(head) < HEADER.size:
        raise _BadFileError(f"torn: {len(head)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, round_, length, digest = HEADER.unpack(head)
    if magic != MAGIC:
        raise _BadFileError("not a fedopt checkpoint (bad magic; a write that never finished?)")
    if version != FORMAT_VERSION:
        raise _BadFileError(f"format version {version}; this fedopt reads version {FORMAT_VERSION}")
    size = os.fstat(fh.fileno()).st_size - HEADER.size
    if size != length:
        raise _BadFileError(f"torn: the body has {size} bytes, the header says {length}")
    sha = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        sha.update(chunk)
    if sha.digest() != digest:
        raise _BadFileError("corrupt: the body's sha256 does not match the header")
    named = _NAME.fullmatch(path.name)
    if named is not None and int(named[1]) != round_:
        raise _BadFileError(f"the header says round {round_}, the file name round {int(named[1])}")
    return round_


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file.

    Raises
    ------
    RunError
        The file is missing, unreadable, torn, corrupt or cannot be unpickled;
        the message names the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            round_ = _verify(fh, path)
            fh.seek(HEADER.size)
            payload = pickle.load(fh)
    except _BadFileError as err:
        raise RunError(f"checkpoint {path} is not usable: {err}") from None
    except OSError as err:
        raise RunError(f"checkpoint {path} cannot be read: {err.strerror or err}") from None
    except Exception as err:  # unpickling runs arbitrary code: a class that moved, ...
        raise RunError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict):
        raise RunError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict")
    return Checkpoint(round=round_, path=path, payload=payload)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that verifies, or ``None`` when there is none.

    Newest means the highest round in the file name (not the modification
    time). A file that does not verify is skipped with a warning on the
    ``fedopt`` logger naming it and why.
    """
    for _, path in reversed(_listing(Path(run_dir) / CHECKPOINT_DIR)):
        try:
            return read_checkpoint(path)
        except RunError as err:
            log.warning("skipping a checkpoint: %s", err)
    return None


class StopRequest:
    """A request to stop a run after its current round, set by a signal or by code.

    Safe to set from a signal handler or another thread and to poll from the
    server loop. ``signal_name`` is the name given to the first :meth:`set`.
    A second signal marks the request ``at_once`` (:meth:`is_hard`): loops
    that wait for replies should give up instead of finishing the round.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._hard = threading.Event()
        self.signal_name: str | None = None

    def set(self, name: str | None = None, *, at_once: bool = False) -> None:
        """Ask the run to stop; ``name`` (e.g. ``"SIGTERM"``) says who asked."""
        if not self._event.is_set():
            self.signal_name = name
            self._event.set()
        if at_once:
            self._hard.set()

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def is_hard(self) -> bool:
        """True once a stop at once (not after the round) was requested."""
        return self._hard.is_set()

    def __repr__(self) -> str:
        return (
            f"StopRequest(set={self.is_set()}, hard={self.is_hard()}, "
            f"signal_name={self.signal_name!r})"
        )


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _after(fn: Callable[..., Any], then: Callable[[], None]) -> Callable[..., Any]:
    """``fn`` that calls ``then()`` once it returns or raises."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            then()

    return call


@contextmanager
def _ray_keeps_off(previous: dict[int, Any], reinstall: Callable[[], None]) -> Iterator[None]:
    """Keep Ray from taking SIGTERM over while the context is open.

    ``ray.init`` in the main thread replaces the SIGTERM handler twice: in
    Python (``ray._private.utils.set_sigterm_handler``, a handler that exits at
    once) and in C++ (the core worker's absl failure-signal handler, which logs
    a stack trace, passes the signal on and aborts the process 3 seconds later
    with SIGABRT); ``ray.shutdown`` resets it to the default action. Inside the
    context the Python call only records Ray's handler as the one to restore on
    exit, and ``ray.init`` and ``ray.shutdown`` re-install our handlers when
    they return, which also takes SIGTERM back from the C++ handler.
    """
    try:
        import ray
        import ray._private.utils as ray_utils
    except ImportError:
        yield
        return

    def remember(handler: Any) -> None:
        previous[signal.SIGTERM] = handler

    patches = [(ray_utils, "set_sigterm_handler", remember)]
    patches += [(ray, name, _after(getattr(ray, name), reinstall)) for name in ("init", "shutdown")]
    saved = [(module, name, getattr(module, name), new) for module, name, new in patches]
    for module, name, new in patches:
        setattr(module, name, new)
    try:
        yield
    finally:
        for module, name, old, new in reversed(saved):
            if getattr(module, name) is new:
                setattr(module, name, old)


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Turn Ctrl-C (SIGINT) and SIGTERM into ``stop.set(...)`` while the context is open.

    The first signal sets ``stop`` and logs a warning; the run is expected to
    finish its round, write a checkpoint and raise
    :class:`~fedopt.errors.RunInterrupted`. A second signal restores the
    previous handlers and raises ``KeyboardInterrupt`` (hard stop). The
    previous handlers are restored on exit. Python only lets the main thread
    install handlers: called from another thread this does nothing but yield
    ``stop``. Ray started or stopped inside the context (``ray.init``,
    ``ray.shutdown``, as Flower's simulation engine calls them) does not take
    the handlers over (see :func:`_ray_keeps_off`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    received: list[str] = []

    def install() -> None:
        if len(received) < 2 and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if len(received) == 1:
            stop.set(name)
            log.warning(
                "%s: stopping after the current round; a checkpoint will be written "
                "(%s again stops at once)",
                name,
                name,
            )
            return
        stop.set(name, at_once=True)
        restore()
        raise KeyboardInterrupt(f"{received[0]}, then {name}: stopping at once")

    install()
    try:
        with _ray_keeps_off(previous, install):
            yield stop
    finally:
        restore()
