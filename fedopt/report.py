"""Run reports: the metrics.jsonl log, metrics.csv, summary.json and per-run plots.

The server loop appends one row per round to ``metrics.jsonl`` through
:class:`MetricsLog`; every row is flushed and fsynced, so a crash loses at most
the row being written. Everything else in a run directory (``metrics.csv``,
``summary.json``, the PNG plots) is derived from those rows and can be rebuilt
with :func:`regenerate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedopt.errors import ConfigError

__all__ = [
    "LOSS_FOR_ACCURACY",
    "METRICS_FILE",
    "SUMMARY_KEYS",
    "MetricsLog",
    "accuracy_key",
    "jsonable",
    "loss_key",
    "read_metrics",
    "regenerate",
    "series",
    "summarize",
    "write_json_atomic",
    "write_metrics_csv",
    "write_run_files",
    "write_text_atomic",
]

METRICS_FILE = "metrics.jsonl"
SUMMARY_KEYS = (
    "rounds",
    "accuracy_metric",
    "final_accuracy",
    "best_accuracy",
    "best_round",
    "final_loss",
    "best_loss",
    "final_train_loss",
    "sim_time",
    "bytes_down_total",
    "bytes_up_total",
    "bytes_total",
    "wall_time",
)
LOSS_FOR_ACCURACY = (("central_accuracy", "central_loss"), ("fed_accuracy", "fed_loss"))


def jsonable(obj: Any) -> Any:
    """Return ``obj`` as plain JSON values; non-finite floats become ``None``.

    Mappings become dicts with string keys, tuples and arrays become lists and
    numpy scalars become Python numbers, so ``json.dumps(..., allow_nan=False)``
    always succeeds on the result.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} value {obj!r} as JSON")


class MetricsLog:
    """Append-only metrics.jsonl writer: each row is written, flushed and fsynced as it comes.

    Opening a log whose file ends in a torn line (a write cut short by a crash)
    cuts that fragment off first, so the next row starts on a line of its own.

    Parameters
    ----------
    path : Path
        The ``metrics.jsonl`` file; missing parent folders are created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file: io.TextIOWrapper | None = open(self.path, "a", encoding="utf-8")

    def _repair_tail(self) -> None:
        """Drop an unterminated last line that is not a whole JSON object."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        if _parse_object(data[cut:].decode("utf-8", errors="replace")) is not None:
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
        else:
            os.truncate(self.path, cut)

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one JSON line (non-finite floats as ``null``), flush and fsync."""
        if self._file is None:
            raise ValueError(f"metrics log {self.path} is closed")
        line = json.dumps(jsonable(row), allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_object(text: str) -> dict | None:
    """Return ``text`` parsed as a JSON object, or ``None`` when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """Read ``run_dir/metrics.jsonl``; a torn last line (partial write) is ignored.

    Raises
    ------
    ConfigError
        The file is missing, or a line other than the last is not a JSON object.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError("run_dir", str(run_dir), "a run directory holding metrics.jsonl")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        obj = _parse_object(line)
        if obj is None:
            if number == len(lines):
                break
            raise ConfigError(
                "run_dir", str(run_dir), f"a metrics.jsonl of JSON objects (line {number} is not)"
            )
        rows.append(obj)
    return rows


def _is_number(value: Any) -> bool:
    """True for finite ints and floats (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def series(rows: Sequence[Mapping[str, Any]], y: str, *, x: str = "round") -> tuple[list, list]:
    """Return ``(xs, ys)`` over the rows where both ``x`` and ``y`` are finite numbers."""
    pairs = [(r[x], r[y]) for r in rows if _is_number(r.get(x)) and _is_number(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def accuracy_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Return ``"central_accuracy"`` if any row has it, else ``"fed_accuracy"``, else ``None``."""
    for key, _ in LOSS_FOR_ACCURACY:
        if any(_is_number(r.get(key)) for r in rows):
            return key
    return None


def loss_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Return the evaluation loss that matches :func:`accuracy_key` (``None`` without one)."""
    return dict(LOSS_FOR_ACCURACY).get(accuracy_key(rows) or "")


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The last finite value of ``key``, or ``None``."""
    values = series(rows, key, x=key)[1]
    return values[-1] if values else None


def summarize(rows: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None) -> dict:
    """Summarize a run's rows; the keys are :data:`SUMMARY_KEYS`, then ``extra`` on top.

    Final values are the last finite value of a metric, best accuracy is the
    maximum (``best_round`` is the first round reaching it) and best loss the
    minimum of the evaluation loss that matches the accuracy metric. Byte
    totals are sums of the per-round ``bytes_down`` and ``bytes_up``.
    """
    acc_key, l_key = accuracy_key(rows), loss_key(rows)
    rounds, accs = series(rows, acc_key) if acc_key else ([], [])
    losses = series(rows, l_key, x=l_key)[1] if l_key else []
    best = max(accs) if accs else None
    down = sum(int(r["bytes_down"]) for r in rows if _is_number(r.get("bytes_down")))
    up = sum(int(r["bytes_up"]) for r in rows if _is_number(r.get("bytes_up")))
    out: dict[str, Any] = {
        "rounds": rows[-1].get("round") if rows else None,
        "accuracy_metric": acc_key,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": best,
        "best_round": rounds[accs.index(best)] if accs else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "final_train_loss": _last(rows, "train_loss"),
        "sim_time": _last(rows, "sim_time"),
        "bytes_down_total": down,
        "bytes_up_total": up,
        "bytes_total": down + up,
        "wall_time": _last(rows, "wall_time"),
    }
    ppl = series(rows, "central_perplexity", x="central_perplexity")[1]
    if ppl:  # language modelling
        out.update(final_perplexity=ppl[-1], best_perplexity=min(ppl))
    out.update(extra or {})
    return out


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file that replaces ``path`` only once the block has written it whole.

    It is written beside ``path`` (a temp file in the same folder), flushed and
    fsynced, then renamed over ``path``; if the block raises, the temp file is
    removed and ``path`` is untouched. Never torn.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` through :func:`atomic_file`."""
    with atomic_file(path) as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temp file, fsync, ``os.replace``): never torn."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write the scalar columns of ``rows`` to CSV.

    Columns are the union of keys in first-seen order with ``round`` first;
    keys holding a list or mapping in any row are left out. A missing or
    non-finite value is an empty cell.
    """
    nested = {k for r in rows for k, v in r.items() if not _is_scalar(v)}
    columns = list(dict.fromkeys(["round", *(k for r in rows for k in r)]))
    columns = [c for c in columns if c not in nested]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if (v := jsonable(row.get(c))) is None else v for c in columns])
    return write_text_atomic(path, buf.getvalue())


def write_run_files(
    run_dir: Path, rows: Sequence[Mapping[str, Any]], *, extra: Mapping[str, Any]
) -> dict:
    """Write ``metrics.csv``, ``summary.json`` and the plots into ``run_dir``.

    The plot title is ``extra["scenario"]`` when given, else the folder name.

    Returns
    -------
    dict
        The summary that was written.
    """
    from fedopt import plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(rows, run_dir / "metrics.csv")
    summary = summarize(rows, extra=extra)
    write_json_atomic(run_dir / "summary.json", summary)
    plots.plot_run(rows, run_dir, title=str(extra.get("scenario") or run_dir.name))
    return jsonable(summary)


def regenerate(run_dir: Path) -> dict:
    """Rebuild ``metrics.csv``, ``summary.json`` and plots from ``metrics.jsonl``.

    Fields of an existing ``summary.json`` that :func:`summarize` does not
    produce (seed, versions, scenario, ...) are kept.

    Raises
    ------
    ConfigError
        ``run_dir`` holds no ``metrics.jsonl``, its ``summary.json`` is not a JSON
        object, or another process is writing it (see :mod:`fedopt.runlock`).
    """
    from fedopt.runlock import run_lock

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    with run_lock(run_dir):  # not while a run or resume is writing it
        extra: dict[str, Any] = {}
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            old = _parse_object(summary_path.read_text(encoding="utf-8"))
            if old is None:
                raise ConfigError("run_dir", str(run_dir), "a summary.json holding a JSON object")
            extra = {k: v for k, v in old.items() if k not in SUMMARY_KEYS}
        return write_run_files(run_dir, rows, extra=extra)
