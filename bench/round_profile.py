"""Where a steady round's time goes, by category, in stock Flower and in fedopt, for each N.

Both run the job of bench/common.py (the one bench/overhead.py times) on Ray.
Three sources are combined for the rounds after the first (the window):

- the ServerApp thread, profiled with pyinstrument over exactly the window: its
  time waiting for replies (sleeping between polls, pulling) and its own work
  (message building, serialisation, aggregation, ...);
- the simulation engine's threads in the server process, timed: each
  ``process_message`` call of a worker thread (a Ray actor call: send, run the
  ClientApp, return) and each scan of the dispatcher (the loop that moves
  messages from the LinkState into the workers' queue every 0.1 s);
- the ClientApp in each Ray actor, wrapped so that every message it handles
  is profiled with pyinstrument and its categories logged with timestamps
  (on Linux ``time.perf_counter`` is one clock for every process of a machine).

The per-round table adds up to the wall time of a round: the server thread's
own work by category, then its waiting split in two. While some worker was in
a Ray call, the calls' time is split into the ClientApp's categories and the
rest of the call (Ray transport: pickling the app loader, message and Context,
the actor call, and back), scaled by the overlap of the workers so that they
add up to the part of the wait they cover (calls that overlap the server's own
work are not counted twice); waiting while no worker was busy is polling latency.
The ``profiler`` column is the wrapper's own bookkeeping inside the Ray calls;
pyinstrument's per-call cost inside the handlers cannot be split off, so
profiling slows every round down: bench/overhead.py has the clean seconds.

Usage: python bench/round_profile.py [--clients 10 100 1000] [--rounds R]
       [--systems flower fedopt] [--out DIR] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
from flwr.clientapp import ClientApp
from pyinstrument import Profiler

CATEGORIES = (
    "message building",
    "serialisation",
    "Ray transport",
    "model construction",
    "data loading",
    "training",
    "aggregation",
    "polling/waiting",
    "other",
    "profiler",
)
#: (category, pattern on "file:Class.function"): the innermost frame that matches decides.
RULES = [
    (
        "polling/waiting",
        r":sleep$|threading\.py:\w+\.(wait|wait_for|join|acquire)$|queue\.py:Queue\.get$|"
        r"pull_messages$|get_message_res$",
    ),
    ("aggregation", r"aggregate_(train|evaluate|arrayrecords|metricrecords)$"),
    (
        "serialisation",
        r"flwr/common/serde|google/protobuf|numpy/lib/(format|_format_impl)|pickle|"
        r"Array\.(numpy|from_\w+)$|to_torch_state_dict$|ArrayRecord\.__init__$|"
        r"(record|content|reply)_size$|ByteSize$|codec\.py:",
    ),
    (
        "message building",
        r"configure_(train|evaluate)$|(Message|RecordDict|ConfigRecord|MetricRecord)\.__init__$|"
        r"push_messages$|store_message_ins$|create_message$|_exchange$|deepcopy$|uuid\.py:",
    ),
    ("model construction", r"(make|new|build)_model$|load_state_dict$|load_weights_$"),
    ("data loading", r"client_data$|[.:]tensors$|build_task$|load_task_data$"),
    ("training", r"local_epoch$|train_local$|\.fit$|torch/(optim|autograd)/"),
]
_COMPILED = [(cat, re.compile(p)) for cat, p in RULES]
SERVER_INTERVAL, CLIENT_INTERVAL = 5e-4, 5e-4


def frame_key(frame: Any) -> str:
    """``file:Class.function`` of a pyinstrument frame."""
    cls = f"{frame.class_name}." if frame.class_name else ""
    return f"{frame.file_path or ''}:{cls}{frame.function}"


def short(key: str) -> str:
    """A frame key with only the last two parts of its path."""
    path, _, fn = key.rpartition(":")
    return "/".join(Path(path).parts[-2:]) + ":" + fn


def categorise(root: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per category and per function (self time) of a pyinstrument frame tree."""
    cats: dict[str, float] = defaultdict(float)
    funcs: dict[str, float] = defaultdict(float)
    memo: dict[str, str | None] = {}
    stack = [(root, "other", "")] if root is not None else []
    while stack:
        frame, cat, owner = stack.pop()
        key = owner
        if not frame.is_synthetic:
            key = frame_key(frame)
            if key not in memo:
                memo[key] = next((c for c, rx in _COMPILED if rx.search(key)), None)
            cat = memo[key] or cat
        own = frame.time - sum(c.time for c in frame.children)
        if own > 0:
            cats[cat] += own
            funcs[short(key)] += own
        stack.extend((c, cat, key) for c in frame.children)
    return dict(cats), dict(funcs)


class ProfiledClientApp(ClientApp):
    """A ClientApp that profiles each message its inner app handles and logs the categories.

    One JSON line per message goes to ``<log_dir>/<pid>.jsonl``: the handler's
    start and end (``perf_counter``), its process, its seconds by category, its
    top functions, and the wrapper's own bookkeeping time after the handler
    (inside the Ray call, so it is not counted as Ray transport).
    """

    def __init__(self, inner: ClientApp, log_dir: str) -> None:
        super().__init__()
        self.inner = inner
        self.log_dir = log_dir

    def __call__(self, message: Any, context: Any) -> Any:
        profiler = Profiler(interval=CLIENT_INTERVAL, async_mode="disabled")
        t0 = time.perf_counter()
        profiler.start()
        try:
            return self.inner(message, context)
        finally:
            session = profiler.stop()
            t1 = time.perf_counter()
            cats, funcs = categorise(session.root_frame())
            top = dict(Counter(funcs).most_common(40))
            line = {"t0": t0, "t1": t1, "pid": os.getpid(), "cats": cats, "funcs": top}
            line["book"] = time.perf_counter() - t1
            with open(Path(self.log_dir) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


class _TimedEvent:
    """The dispatcher's stop event; logs each scan (the time between two waits)."""

    def __init__(self, event: Any, log: list[tuple[float, float]]) -> None:
        self._event, self._log, self._woke = event, log, time.perf_counter()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._log.append((self._woke, time.perf_counter()))
        done = self._event.wait(timeout)
        self._woke = time.perf_counter()
        return done


@dataclass
class Probe:
    """What one run recorded in the server process, and its window of steady rounds."""

    first: int
    last: int
    calls: list[tuple[float, float]] = field(default_factory=list)
    scans: list[tuple[float, float]] = field(default_factory=list)
    opened: float = 0.0
    closed: float = 0.0
    profiler: Any = None
    session: Any = None

    def on_round(self, server_round: int) -> None:
        """Called in the ServerApp thread as each round ends: opens and closes the window."""
        if server_round == self.first:
            self.profiler = Profiler(interval=SERVER_INTERVAL, async_mode="disabled")
            self.profiler.start()
            self.opened = time.perf_counter()
        elif server_round == self.last and self.profiler is not None:
            self.closed = time.perf_counter()
            self.session = self.profiler.stop()


@contextmanager
def engine_probes(probe: Probe) -> Iterator[None]:
    """Time the engine's Ray calls and dispatcher scans in this process (restored after)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    owner = next(c for c in raybackend.RayBackend.__mro__ if "process_message" in vars(c))
    call, dispatch = owner.process_message, vce_api.add_messages_to_queue

    def process_message(self: Any, message: Any, context: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return call(self, message, context)
        finally:
            probe.calls.append((t0, time.perf_counter()))

    def add_messages_to_queue(state: Any, queue: Any, mapping: Any, f_stop: Any) -> None:
        dispatch(state, queue, mapping, _TimedEvent(f_stop, probe.scans))

    owner.process_message = process_message
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        owner.process_message = call
        vce_api.add_messages_to_queue = dispatch


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def breakdown(probe: Probe, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per round by category (they add up to the wall time) and the engine's numbers."""
    lo, hi, rounds = probe.opened, probe.closed, probe.last - probe.first
    inside = [r for r in records if lo <= r["t0"] < hi]
    calls = [(a, b) for a, b in probe.calls if lo <= a < hi]
    if not inside or not calls or probe.session is None:
        raise SystemExit("nothing was recorded in the window: did the ClientApp wrapper run?")
    server, server_funcs = categorise(probe.session.root_frame())
    waiting = server.pop("polling/waiting", 0.0)
    busy = union_length(calls)
    in_calls = sum(b - a for a, b in calls)
    in_app = sum(r["t1"] - r["t0"] for r in inside)
    book = sum(r["book"] for r in inside)
    transport = max(in_calls - in_app - book, 0.0)
    covered = min(busy, waiting)  # calls while the server also worked overlap its own work
    scale = covered / in_calls
    cats = dict.fromkeys(CATEGORIES, 0.0)
    client_funcs: Counter[str] = Counter()
    for key, value in server.items():
        cats[key] += value
    for rec in inside:
        for key, value in rec["cats"].items():
            cats[key] += value * scale
        client_funcs.update(rec["funcs"])
    cats["Ray transport"] += transport * scale
    cats["profiler"] += book * scale
    cats["polling/waiting"] += waiting - covered
    return {
        "wall": (hi - lo) / rounds,
        "categories": {k: v / rounds for k, v in cats.items()},
        "messages": len(calls) / rounds,
        "workers": len({r["pid"] for r in inside}),
        "app_ms": 1e3 * in_app / len(inside),
        "transport_ms": 1e3 * transport / len(calls),
        "parallelism": in_calls / busy,
        "scan": sum(min(b, hi) - max(a, lo) for a, b in probe.scans if b > lo and a < hi) / rounds,
        "server_top": {k: v / rounds for k, v in Counter(server_funcs).most_common(12)},
        "client_top": {k: v / rounds for k, v in client_funcs.most_common(12)},
    }


def profile_run(system: str, n: int, rounds: int, save_to: Path | None) -> dict[str, Any]:
    """One profiled run of ``system`` at ``n`` clients, in a fresh process; its breakdown."""
    import round_profile  # this module by its importable name: Ray workers load the wrapper

    probe = Probe(first=1, last=rounds)
    with tempfile.TemporaryDirectory() as logs, engine_probes(probe):

        def wrap(app: ClientApp) -> ClientApp:
            return round_profile.ProfiledClientApp(app, logs)

        if system == "flower":
            common.run_flower(n, rounds, wrap=wrap, on_round=probe.on_round)
        else:
            from fedopt import simulation

            make_app = simulation.make_client_app
            simulation.make_client_app = lambda resolve, **kw: wrap(make_app(resolve, **kw))
            try:
                raw = common.fedopt_raw(n, rounds)

                def on_row(row: dict[str, Any]) -> None:
                    probe.on_round(int(row["round"]))

                common.run_fedopt(raw, Path(logs) / "runs", on_row=on_row)
            finally:
                simulation.make_client_app = make_app
        records = [json.loads(line) for path in Path(logs).glob("*.jsonl") for line in path.open()]
    res = breakdown(probe, records)
    if save_to is not None:
        save(save_to, f"{system}-{n}", res, probe)
    return res


SYSTEMS = {"flower": "stock Flower", "fedopt": "fedopt"}


def tables(results: list[tuple[str, int, dict[str, Any]]]) -> str:
    """The two markdown tables: seconds per round by category, and the engine's numbers."""
    head = ["system", "N", "wall s/round", *CATEGORIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, n, res in results:
        cells = [f"{res['categories'][c]:.4f}" for c in CATEGORIES]
        lines.append(f"| {SYSTEMS[system]} | {n} | {res['wall']:.4f} | " + " | ".join(cells) + " |")
    head = [
        "system",
        "N",
        "messages/round",
        "Ray workers",
        "ClientApp ms/message",
        "Ray transport ms/message",
        "workers busy at once",
        "dispatcher scans s/round",
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, n, res in results:
        lines.append(
            f"| {SYSTEMS[system]} | {n} | {res['messages']:.0f} | {res['workers']} | "
            f"{res['app_ms']:.2f} | {res['transport_ms']:.2f} | {res['parallelism']:.2f} | "
            f"{res['scan']:.4f} |"
        )
    return "\n".join(lines)


def top_lines(system: str, n: int, res: dict[str, Any], k: int = 6) -> list[str]:
    """The functions with the most self time, server thread and ClientApp (s/round)."""
    lines = [f"{SYSTEMS[system]}, N = {n}:"]
    for side, label in (("server_top", "server thread"), ("client_top", "ClientApp (all)")):
        items = list(res[side].items())[:k]
        lines.append(f"  {label}: " + ", ".join(f"{f} {v:.4f}" for f, v in items))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, help="rounds per run (default 5; 3 from N = 1000)")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--out", type=Path, help="write pyinstrument profiles and JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    results = []
    for n in args.clients:
        rounds = args.rounds or (3 if n >= 1000 else 5)
        for system in args.systems:
            t0 = time.perf_counter()
            res = common.isolated(profile_run, system, n, rounds, args.out)
            results.append((system, n, res))
            print(
                f"{SYSTEMS[system]}, N = {n}: {res['wall']:.4f} s/round profiled "
                f"({rounds} rounds, {time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    text = "\n".join(
        [
            "Seconds per steady round (profiled; the categories add up to the wall time)",
            "",
            tables(results),
            "",
            "Most self time, seconds per round:",
            *[line for system, n, res in results for line in top_lines(system, n, res)],
        ]
    )
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


def save(out: Path, name: str, res: dict[str, Any], probe: Probe) -> None:
    """The server thread's pyinstrument profile (HTML, text, session) and the breakdown (JSON).

    ``pyinstrument --load <name>-server.pyisession`` renders the session again.
    """
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer

    out.mkdir(parents=True, exist_ok=True)
    probe.session.save(str(out / f"{name}-server.pyisession"))
    (out / f"{name}-server.html").write_text(HTMLRenderer().render(probe.session))
    (out / f"{name}-server.txt").write_text(ConsoleRenderer(show_all=True).render(probe.session))
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
