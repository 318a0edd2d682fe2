"""Cold start: process start to round 1 of ``fedopt run scenarios/quickstart.toml``, vs a floor.

Measured in fresh subprocesses, interleaved, median of ``--repeats``:

- floor:   a bare Python process that imports torch and trains one
           quickstart-like round (an MLP 64-128-10 on 10 clients of digits-shaped
           data, 1437 examples, one epoch of SGD, batch 16, weights averaged);
           its data is synthetic, so no dataset loader is imported;
- fedopt:  ``fedopt run scenarios/quickstart.toml --set run.rounds=1`` from the
           process's start to its round-1 metrics row (``metrics.jsonl`` watched
           every 10 ms), with the start-up timeline the run writes
           (``startup.json``: imports done, ``ray.init`` returned, task built on
           the driver, federation up, round 0, the workers warm). The steps
           overlap (Ray starts while the task is built), so each row is the time
           since process start at which that step was done.

``--baseline-tree PATH`` also measures ``fedopt run`` from another source tree
(run from that directory, so its ``fedopt`` is the one imported), interleaved
with the others: before/after comparisons on a noisy machine. Progress goes to
stderr, the table to stdout.
:func:`cold_start_rows` returns the rows for other benches.

Usage: python bench/cold_start.py [--repeats 3] [--baseline-tree PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "quickstart.toml"

#: The startup.json marks shown, in order, with their labels.
STEPS = (
    ("entered", "imports done (fedopt, flwr, torch)"),
    ("ray", "ray.init returned"),
    ("tasks", "task built on the driver"),
    ("federation", "federation up (ServerApp runs)"),
    ("round_0", "round 0 (central eval of the initial model)"),
    ("actors_warm", "workers warm (torch and fedopt imported)"),
    ("round_1", "round 1 row (startup.json)"),
)

FLOOR = """
import time
t0 = time.time()
import torch
from torch import nn
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(1437, 64, generator=g), torch.randint(0, 10, (1437,), generator=g)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
start = {k: v.clone() for k, v in model.state_dict().items()}
total = {k: torch.zeros_like(v) for k, v in start.items()}
for cx, cy in zip(x.chunk(10), y.chunk(10)):
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(0, len(cx), 16):
        opt.zero_grad()
        nn.functional.cross_entropy(model(cx[i:i + 16]), cy[i:i + 16]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        total[k] += v / 10
model.load_state_dict(total)
print(time.time())
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def floor_once() -> float:
    """Seconds from spawning the bare process to the end of its round."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) - t0


def _round_1_seen(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line).get("round") == 1:
                return True
        except ValueError:
            continue
    return False


def fedopt_once(*, tree: Path | None = None, rounds: int = 1) -> dict[str, float]:
    """``{step: seconds since spawn}`` of one ``fedopt run`` (``round_1_row``: metrics.jsonl)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="cold-start-") as out:
        cmd = [sys.executable, "-m", "fedopt.cli", "run", str(SCENARIO), "--out", out]
        cmd += ["--set", f"run.rounds={rounds}"]
        t0 = time.time()
        proc = subprocess.Popen(
            cmd, cwd=tree or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        seen: float | None = None
        while proc.poll() is None or seen is None:
            if seen is None and any(_round_1_seen(p) for p in Path(out).glob("*/*/metrics.jsonl")):
                seen = time.time() - t0
            if proc.poll() is not None and seen is None:
                break
            time.sleep(0.01)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.wait() != 0 or seen is None:
            raise RuntimeError(f"fedopt run failed ({proc.returncode}): {err[-2000:]}")
        times = {"round_1_row": seen}
        for path in Path(out).glob("*/*/startup.json"):
            marks = json.loads(path.read_text())["epoch"]
            times.update({k: v - t0 for k, v in marks.items() if k != "process"})
        return times


def cold_start_rows(
    *, repeats: int = 3, rounds: int = 1, baseline_tree: Path | None = None
) -> list[dict[str, Any]]:
    """Median seconds of each measurement, interleaved over ``repeats``; one dict per row.

    Each row has ``measured``, ``seconds``, ``baseline`` (the floor),
    ``baseline_seconds`` and ``ratio``.
    """
    floors: list[float] = []
    runs: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    for r in range(repeats):
        floors.append(floor_once())
        say(f"[{r + 1}/{repeats}] floor {floors[-1]:.2f}s")
        runs.append(fedopt_once(rounds=rounds))
        say(f"[{r + 1}/{repeats}] fedopt run: round 1 at {runs[-1]['round_1_row']:.2f}s")
        if baseline_tree is not None:
            base.append(fedopt_once(tree=baseline_tree, rounds=rounds))
            say(f"[{r + 1}/{repeats}] baseline tree: round 1 at {base[-1]['round_1_row']:.2f}s")
    floor = statistics.median(floors)

    def row(label: str, values: list[float]) -> dict[str, Any]:
        sec = statistics.median(values)
        return {
            "measured": label,
            "seconds": sec,
            "baseline": "floor",
            "baseline_seconds": floor,
            "ratio": sec / floor,
        }

    rows = [row("floor: bare process, import torch, one round", floors)]
    for key, label in STEPS:
        values = [t[key] for t in runs if key in t]
        if values:
            rows.append(row(f"fedopt run: {label}", values))
    rows.append(
        row(
            "fedopt run: process start to round 1 (metrics.jsonl)", [t["round_1_row"] for t in runs]
        )
    )
    if base:
        rows.append(
            row(
                f"baseline tree {baseline_tree}: round 1 (metrics.jsonl)",
                [t["round_1_row"] for t in base],
            )
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: seconds since process start and ratio to the floor."""
    lines = ["| measured | seconds | ratio to floor |", "|---|---|---|"]
    lines += [f"| {r['measured']} | {r['seconds']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="rounds the measured run is cut to")
    ap.add_argument("--baseline-tree", type=Path, help="also measure fedopt from this tree")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    rows = cold_start_rows(
        repeats=args.repeats, rounds=args.rounds, baseline_tree=args.baseline_tree
    )
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
