"""fedopt's cache directory (corpora, warm-start checkpoints) and atomic file writes.

The cache lives in ``$FEDOPT_CACHE`` when set, else ``~/.cache/fedopt``.
Entries are keyed by a hash of everything that determines them, written
under a temporary name and renamed into place, so a crash never leaves a torn
entry behind and two processes never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "cache_dir", "config_key"]


def cache_dir(*parts: str) -> Path:
    """``$FEDOPT_CACHE`` (or ``~/.cache/fedopt``) joined with ``parts``; created if missing."""
    root = Path(os.environ.get("FEDOPT_CACHE") or Path.home() / ".cache" / "fedopt")
    path = root.expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_key(config: Any) -> str:
    """A 16-hex-digit key of a JSON-serialisable configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
