"""Population scale: start-up time, seconds per round and peak memory against the number of clients.

Runs ``scenarios/population.toml`` (``lazy_synthetic`` clients generated from
(seed, cid), 100 a round) at 1k, 10k and 100k clients, each in a fresh
process, and prints one markdown table on stdout (progress goes to stderr):

- **start → round 1**: seconds from the process's creation (``psutil``'s
  create time, so interpreter start and imports count) to the row that
  opens round 1 (round 0's central evaluation), and to the end of round 1;
- **s / round**: the median wall time of the rounds after the first;
- **server peak RSS**: the run's own process (``ru_maxrss``), which builds
  the task and runs the server loop;
- **worker peak RSS**: the largest ``VmHWM`` (peak resident set) among the
  Ray worker processes below it, read from ``/proc`` after the last round.

Usage: ``python bench/population.py [--clients 1000 10000 100000] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "population.toml"


def peak_kib(pid: int) -> int:
    """A process's peak resident set (``VmHWM``) in KiB; 0 when it cannot be read."""
    with contextlib.suppress(OSError):  # the process is gone, or no /proc
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def worker_peaks() -> list[int]:
    """Peak RSS (KiB) of every Ray worker process below this one."""
    import psutil

    peaks = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "default_worker.py" in cmd or proc.name().startswith("ray::"):
            peaks.append(peak_kib(proc.pid))
    return [p for p in peaks if p]


def child(clients: int, rounds: int) -> dict[str, Any]:
    """Run the scenario at ``clients`` clients in this process; the measurements."""
    import psutil

    born = psutil.Process().create_time()
    from fedopt import run
    from fedopt.config import load_scenario

    sets = [f"partition.num_clients={clients}", f"run.rounds={rounds}"]
    scenario = load_scenario(SCENARIO, sets)
    stamps: dict[int, float] = {}
    workers: list[int] = []

    def on_row(row: dict[str, Any]) -> None:
        stamps[int(row["round"])] = time.time() - born
        print(
            f"  {clients} clients: round {row['round']} at {stamps[row['round']]:.1f} s",
            file=sys.stderr,
        )
        if row["round"] == rounds:
            workers.extend(worker_peaks())

    with tempfile.TemporaryDirectory() as out:
        result = run(scenario, out=Path(out), on_row=on_row)
    walls = [r["wall_time"] for r in result.rows]
    steps = [b - a for a, b in zip(walls[1:], walls[2:], strict=False)]
    return {
        "clients": clients,
        "to_round1": stamps[0],
        "round1_done": stamps[1],
        "per_round": statistics.median(steps) if steps else float("nan"),
        "server_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mib": max(workers, default=0) / 1024,
        "workers": len(workers),
        "accuracy": result.rows[-1].get("central_accuracy"),
    }


def table(results: list[dict[str, Any]]) -> str:
    """The measurements as a markdown table."""
    lines = [
        "| clients | start → round 1 (s) | start → round 1 done (s) | s / round "
        "| server peak RSS (MiB) | worker peak RSS (MiB, max of n) | central accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']:,} | {r['to_round1']:.1f} | {r['round1_done']:.1f} "
            f"| {r['per_round']:.2f} | {r['server_mib']:.0f} "
            f"| {r['worker_mib']:.0f} (n = {r['workers']}) | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds)))
        return 0
    results = []
    for n in args.clients:
        print(f"{n} clients ...", file=sys.stderr)
        cmd = [sys.executable, __file__, "--child", str(n), "--rounds", str(args.rounds)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode:
            print(f"{n} clients failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
