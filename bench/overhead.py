"""Seconds per round of one FedAvg job against its bare floors and stock Flower, in one run.

The job (bench/common.py): an MLP 64-128-10, 64 examples per client, one
local epoch of SGD (batch 32, lr 0.1), every client in every round, FedAvg.
For each number of clients N it is measured nine ways:

- floor1:          a bare PyTorch loop in this process (load weights, train, average);
- floor2:          the same loop on 2 persistent spawned worker processes (the
                   strictest bare floor on 2 cores; each trains half the clients);
- stock Flower:    Flower 1.41 FedAvg on ``run_simulation`` (Ray), example-style ClientApp;
- pfl-research:    Apple's pfl 0.6 (PyTorch backend) on 1 process and on 2 under torchrun
                   (bench/pfl_job.py, a subprocess); its final weights are checked
                   against the 1-process floor's (same init, data and batch order);
- fedopt:          ``fedopt.run`` on the same job (Ray), the scenario as written;
- fedopt unpacked: the same with ``run.pack = "off"`` (one Flower node and message per client).
- fedopt, batched packs: the same with ``run.vectorize = true`` (a pack's clients train at once).

Two client-side costs are measured in the same run too:

- DP-SGD:   the same fedopt job with the ``dpsgd`` client (Opacus: Poisson
            sampling, per-sample clipping to C = 1, σ = 1, same batch, lr and
            epoch) against the ``sgd`` client, N = 100, both through ``fedopt.run``;
- FedKSeed: one client's local work with the ``fedkseed`` client (τ = 200
            zeroth-order steps, batch 4, on the tiny Llama-style LM over stdlib
            docstrings of scenarios/fedkseed.toml, randomly initialised) against
            plain inference (forward passes under ``torch.no_grad``) over the same
            batches, in this process.

Every Ray run happens in a fresh spawned process (fedopt patches Flower's
engine in the process it runs in, so stock Flower must never follow it in
one). Engine start-up is excluded: a round's steady time is the median of the
round durations after the first. Ratios, not seconds, are the result: these
machines are noisy, so only numbers measured in the same run are compared.
Progress goes to stderr, the table to stdout (and to ``--markdown`` PATH).

Usage: python bench/overhead.py [--clients 10 100 1000] [--rounds R] [--skip-flower]
       [--skip-pfl] [--skip-fedopt] [--pfl-python PY] [--dp-clients 100] [--skip-dp]
       [--skip-fedkseed] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cold_start
import common
import numpy as np
import pfl_job
import torch

#: Rounds per measurement when --rounds is not given: fewer where stock Flower is slow.
#: Seconds from process start to quickstart's round 1 that the cold-start row aims at.
COLD_GOAL = 5.0
DEFAULT_ROUNDS = {10: 8, 100: 6, 1000: 3}
#: Goals: (job, measured, baseline) -> (N values, "le" | "ge", ratio).
GOALS = {
    ("fedavg", "fedopt", "floor2"): ((100, 1000), "le", 1.3),
    ("fedavg", "fedopt, batched packs", "floor2"): ((100, 1000), "le", 1.3),
    ("fedavg", "stock Flower", "fedopt"): ((1000,), "ge", 8.0),
    ("fedavg", "fedopt", "pfl2"): ((100, 1000), "le", 1.0),
    ("fedavg", "fedopt, batched packs", "pfl2"): ((100, 1000), "le", 1.0),
}
#: Largest absolute difference allowed between pfl's final weights and the floor's (float32).
PFL_ATOL = 1e-5
LABELS = {
    "floor1": "floor, 1 process",
    "floor2": "floor, 2 processes",
    "flower": "stock Flower",
    "pfl1": "pfl-research, 1 process",
    "pfl2": "pfl-research, 2 processes (torchrun)",
    "fedopt": "fedopt",
    "unpacked": "fedopt unpacked",
    "vectorized": "fedopt, batched packs",
    "flower_sum": "fedopt, every model to the server (partial_sums = false)",
}
#: The DP-SGD client of the DP row: fixed σ and C, the sgd client's batch, lr and epochs.
DPSGD = {
    "name": "dpsgd",
    "epochs": 1,
    "batch_size": common.BATCH,
    "lr": common.LR,
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "target_epsilon": 1e6,  # a cap no client reaches: every client trains every round
}
#: The FedKSeed measurement: scenarios/fedkseed.toml's data, model and client, no warm start.
FEDKSEED = {
    "name": "bench-fedkseed",
    "data": {"name": "stdlib_docs", "task": "lm", "seq_len": 128, "min_module_docs": 20},
    "partition": {"name": "natural", "num_clients": 59, "test_fraction": 0.1},
    "model": {"name": "transformer", "arch": "llama", "size": "tiny"},
    "client": {"name": "fedkseed", "steps": 200, "batch_size": 4, "lr": 1e-4, "eps": 5e-4},
    "strategy": {"name": "fedkseed", "k": 1024},
    "run": {"rounds": 1},
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a measurement against a baseline from the same run."""

    job: str
    n: str
    measured: str
    seconds: float | None
    baseline: str
    base_seconds: float | None
    goal: tuple[tuple[int, ...], str, float] | None = None
    note: str = ""

    def cells(self) -> list[str]:
        ok = self.seconds is not None and self.base_seconds is not None
        ratio = self.seconds / self.base_seconds if ok else None
        return [
            self.job,
            self.n,
            self.measured,
            _seconds(self.seconds),
            self.baseline,
            _seconds(self.base_seconds),
            "n/a" if ratio is None else f"{ratio:.2f}x",
            "; ".join(t for t in (self.verdict(ratio), self.note) if t),
        ]

    def verdict(self, ratio: float | None) -> str:
        """``"≤ 1.2x: met"`` and the like where a goal applies at this N, else empty."""
        if self.goal is None or int(self.n) not in self.goal[0]:
            return ""
        _, kind, bound = self.goal
        sign, met = ("≤", ratio is not None and ratio <= bound)
        if kind == "ge":
            sign, met = ("≥", ratio is not None and ratio >= bound)
        return f"{sign} {bound:g}x: " + ("n/a" if ratio is None else "met" if met else "missed")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def say(text: str) -> None:
    """A progress line (stderr)."""
    print(text, file=sys.stderr, flush=True)


def timed(label: str, fn: Callable[..., list[float] | None], *args: Any) -> float | None:
    """Run one measurement; report and return its steady seconds per round (None: n/a)."""
    t0 = time.perf_counter()
    times = fn(*args)
    if times is None:
        say(f"  {label}: n/a (this fedopt does not know a run key it needs)")
        return None
    value = common.steady(times)
    rounds = ", ".join(f"{t:.3f}" for t in times)
    say(f"  {label}: {value:.4f} s/round (rounds: {rounds}; {time.perf_counter() - t0:.0f} s)")
    return value


def fedopt_times(n: int, rounds: int, out: Path, label: str, **kw: Any) -> float | None:
    """A fedopt measurement in a fresh process; None when this fedopt lacks a ``run`` key."""
    raw = common.fedopt_raw(n, rounds, **kw)
    return timed(label, common.isolated, common.run_fedopt, raw, out)


def pfl_times(
    n: int, rounds: int, *, procs: int, python: str, reference: dict[str, np.ndarray]
) -> tuple[float | None, str, bool]:
    """One pfl run on ``procs`` processes: steady s/round, the weights check's note, its verdict.

    The check: the largest absolute difference between pfl's final weights and
    ``reference`` (the 1-process floor's after the same rounds) is at most
    :data:`PFL_ATOL`. A run that fails is reported and gives ``None``.
    """
    label = LABELS[f"pfl{procs}"]
    found: dict[str, dict[str, np.ndarray]] = {}

    def run() -> list[float]:
        times, found["weights"] = pfl_job.launch(n, rounds, procs=procs, python=python)
        return times

    try:
        value = timed(label, run)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        say(f"  {label}: failed: {err}")
        return None, "pfl run failed", False
    diff = pfl_job.max_abs_diff(reference, found["weights"])
    ok = diff <= PFL_ATOL
    say(
        f"    final weights against the floor's: max |Δ| = {diff:.1e} "
        f"(tolerance {PFL_ATOL:g}): {'equal' if ok else 'NOT EQUAL'}"
    )
    return value, f"weights = floor's ± {PFL_ATOL:g}: {'met' if ok else 'missed'} ({diff:.1e})", ok


def fedavg_rows(
    n: int, rounds: int, out: Path, *, flower: bool, fedopt: bool, pfl: str | None
) -> tuple[list[Row], bool]:
    """Every FedAvg measurement at ``n`` clients per round, as table rows.

    ``pfl`` is the Python that runs bench/pfl_job.py (None: no pfl rows). Also
    returns whether every pfl weights check passed.
    """
    say(f"N = {n} clients per round, {rounds} rounds")
    s: dict[str, float | None] = {
        "floor1": timed(LABELS["floor1"], common.floor1, n, rounds),
        "floor2": timed(LABELS["floor2"], common.floor2, n, rounds),
    }
    notes: dict[str, str] = {}
    checked = True
    if flower:
        s["flower"] = timed(LABELS["flower"], common.isolated, common.run_flower, n, rounds)
    if pfl is not None:
        reference = pfl_job.floor_weights(n, rounds)
        for procs in (1, 2):
            key = f"pfl{procs}"
            if n % procs:
                say(f"  {LABELS[key]}: skipped (N must be a multiple of the {procs} processes)")
                continue
            s[key], notes[key], ok = pfl_times(
                n, rounds, procs=procs, python=pfl, reference=reference
            )
            checked &= ok
    if fedopt:
        s["fedopt"] = fedopt_times(n, rounds, out, LABELS["fedopt"])
        s["unpacked"] = fedopt_times(n, rounds, out, LABELS["unpacked"], pack="off")
        s["vectorized"] = fedopt_times(n, rounds, out, LABELS["vectorized"], vectorize=True)
        s["flower_sum"] = fedopt_times(n, rounds, out, LABELS["flower_sum"], partial_sums=False)
    pairs = [
        ("floor2", "floor1"),
        ("flower", "floor2"),
        ("pfl1", "floor1"),
        ("pfl2", "floor2"),
        ("fedopt", "floor2"),
        ("unpacked", "floor2"),
        ("vectorized", "floor2"),
        ("flower_sum", "floor2"),
        ("fedopt", "floor1"),
        ("flower", "fedopt"),
        ("fedopt", "pfl2"),
        ("vectorized", "pfl2"),
    ]
    rows = [
        Row(
            "fedavg",
            str(n),
            LABELS[m],
            s[m],
            LABELS[b],
            s[b],
            GOALS.get(("fedavg", LABELS[m], b)),
            notes.get(m, "") if b.startswith("floor") else "",
        )
        for m, b in pairs
        if m in s and b in s
    ]
    return rows, checked


def dp_row(n: int, rounds: int, out: Path, sgd: float | None) -> Row:
    """DP-SGD round against a non-private round, both fedopt at ``n`` clients."""
    say(f"DP-SGD at N = {n}, {rounds} rounds")
    if sgd is None:
        sgd = fedopt_times(n, rounds, out, "fedopt sgd")
    dp = fedopt_times(n, rounds, out, "fedopt dpsgd", client=DPSGD)
    return Row("dpsgd", str(n), "fedopt, dpsgd client", dp, "fedopt, sgd client", sgd)


def fedkseed_row(repeats: int = 5) -> Row:
    """One FedKSeed client's local work against inference over the same batches (in-process)."""
    from flwr.app import RecordDict

    from fedopt import parse_scenario
    from fedopt.client import ClientJob, ClientState
    from fedopt.registry import CLIENTS
    from fedopt.task import as_tensors, build_task
    from fedopt.training import objective, shuffled_batches

    say("FedKSeed local work vs inference (in-process)")
    scenario = parse_scenario(FEDKSEED)
    task = build_task(scenario)
    params = scenario.client.params
    algorithm = CLIENTS.get("fedkseed").obj(params, scenario=scenario)
    model = task.new_model()
    x, y = as_tensors(task.client_data(0)[0], torch.device("cpu"))
    k = scenario.strategy.params.k

    def job(seed: int) -> ClientJob:
        return ClientJob(
            cid=0,
            server_round=1,
            model=model,
            x=x,
            y=y,
            config={},
            content=RecordDict(),
            state=ClientState(RecordDict(), 0),
            generator=torch.Generator().manual_seed(seed),
            device=torch.device("cpu"),
        )

    def fedkseed(seed: int) -> None:
        algorithm.fit(job(seed))

    def inference(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)  # the batches fit draws: seed picks, then batches
        torch.randint(k, (params.steps,), generator=g)
        model.eval()
        with torch.no_grad():
            for idx in shuffled_batches(len(x), params.batch_size, params.steps, g, x.device):
                objective(model(x[idx]), y[idx].long())

    fedkseed(0)  # first calls: lazy initialisation, the client's one-off model check
    inference(0)
    zo_times, inf_times = [], []
    for seed in range(1, repeats + 1):  # interleaved, so that load from elsewhere hits both
        for fn, times in ((fedkseed, zo_times), (inference, inf_times)):
            t0 = time.perf_counter()
            fn(seed)
            times.append(time.perf_counter() - t0)
    zo, inf = statistics.median(zo_times), statistics.median(inf_times)
    say(f"  fedkseed {zo:.4f} s, inference {inf:.4f} s per client round ({len(x)} examples)")
    return Row(
        "fedkseed",
        "1",
        f"fedkseed local work, τ = {params.steps} (in-process)",
        zo,
        "inference, same batches (in-process)",
        inf,
    )


def cold_rows(repeats: int) -> list[Row]:
    """quickstart's process start to round 1, step by step, against a bare torch process."""
    out = []
    for r in cold_start.cold_start_rows(repeats=repeats):
        last = r["measured"].endswith("process start to round 1 (metrics.jsonl)")
        verdict = "met" if r["seconds"] <= COLD_GOAL else "missed"
        out.append(
            Row(
                "cold start",
                "10",
                r["measured"],
                r["seconds"],
                r["baseline"],
                r["baseline_seconds"],
                note=f"≤ {COLD_GOAL:g} s: {verdict}" if last else "",
            )
        )
    return out


def table(rows: list[Row]) -> str:
    """The markdown table of every row."""
    head = ["job", "N", "measured", "seconds", "baseline", "seconds", "ratio", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 8/6/3)")
    parser.add_argument("--skip-flower", action="store_true", help="no stock Flower runs")
    parser.add_argument("--skip-pfl", action="store_true", help="no pfl-research runs")
    parser.add_argument(
        "--skip-fedopt", action="store_true", help="no fedopt FedAvg runs (the DP row stays)"
    )
    parser.add_argument(
        "--pfl-python",
        default=sys.executable,
        help="the Python with pfl that runs bench/pfl_job.py (default: this one)",
    )
    parser.add_argument("--dp-clients", type=int, default=100, help="N of the DP-SGD row")
    parser.add_argument("--skip-dp", action="store_true", help="no DP-SGD row")
    parser.add_argument("--skip-fedkseed", action="store_true", help="no FedKSeed row")
    parser.add_argument("--skip-cold-start", action="store_true", help="no cold-start rows")
    parser.add_argument(
        "--cold-repeats", type=int, default=3, help="cold starts to take the median of"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    def rounds(n: int) -> int:
        if args.rounds is not None:
            return args.rounds
        return DEFAULT_ROUNDS.get(n, 3 if n >= 1000 else 6)

    t0 = time.perf_counter()
    pfl = None if args.skip_pfl else args.pfl_python
    if pfl is not None and not pfl_job.available(pfl):
        say(pfl_job.INSTALL_HINT.format(python=pfl))
        pfl = None
    rows: list[Row] = []
    fedopt: dict[int, float | None] = {}
    checked = True
    with common.quiet(), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for n in args.clients:
            found, ok = fedavg_rows(
                n, rounds(n), out, flower=not args.skip_flower, fedopt=not args.skip_fedopt, pfl=pfl
            )
            fedopt[n] = next((r.seconds for r in found if r.measured == LABELS["fedopt"]), None)
            rows += found
            checked &= ok
        if not args.skip_dp:
            n = args.dp_clients
            rows.append(dp_row(n, rounds(n), out, fedopt.get(n)))
        if not args.skip_fedkseed:
            rows.append(fedkseed_row())
    if not args.skip_cold_start:
        say("cold start: quickstart, process start to round 1")
        rows += cold_rows(args.cold_repeats)
    say(f"done in {time.perf_counter() - t0:.0f} s")
    text = "\n".join(
        [
            f"{os.cpu_count()} CPU cores, torch {torch.__version__} with 1 thread per process, "
            f"Python {platform.python_version()}; seconds: steady s/round (median after round 1), "
            "fedkseed: s per client round (median of 5)",
            "",
            table(rows),
        ]
    )
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    if not checked:
        sys.exit("a pfl-research run failed or its final weights differ from the floor's")


if __name__ == "__main__":
    main()
