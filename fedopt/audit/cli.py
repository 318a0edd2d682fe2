"""``fedopt audit``: run an audited scenario (or sweep cell) and print one table of ε bounds.

The table has one row per audited client and attack: m, the guesses and how
many were right, the proven ε lower bound at confidence 1 − β, the most m
canaries can prove with the same guess counts, and the ε every registered
accountant reports for that client's recorded ledger.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from fedopt.audit.run import ATTACKS, audit_scenario, load_target, run_audit
from fedopt.errors import ConfigError

__all__ = ["audit_command", "audit_table"]


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else ("n/a" if math.isnan(value) else f"{value:.3f}")


def audit_table(result: Mapping[str, Any]) -> Table:
    """The audit's table (rich)."""
    names = sorted({n for c in result["clients"].values() for n in c["reported_epsilon"]})
    table = Table(
        title=f"one-run audit of {result['scenario']}: ε lower bounds at "
        f"{1 - result['beta']:.0%} confidence, δ = {result['delta']:g}"
    )
    for col in ("client", "attack", "m", "guesses", "correct", "ε ≥", "max ε ≥ (m)"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for name in names:
        table.add_column(f"reported ε ({name})", justify="right")
    for cid, row in result["clients"].items():
        for attack, label in ATTACKS.items():
            b = row[attack]
            table.add_row(
                cid,
                label,
                str(row["m"]),
                str(b["guesses"]),
                str(b["correct"]),
                _eps(b["epsilon"]),
                _eps(b["cap"]),
                *(_eps(row["reported_epsilon"].get(n, math.nan)) for n in names),
            )
    return table


def audit_command(
    args: argparse.Namespace, console: Console, *, progress: Callable[..., Any] | None = None
) -> int:
    """Run ``fedopt audit`` with parsed arguments; 0 on success."""
    if args.canaries is not None and args.canaries < 2:
        raise ConfigError("--canaries", args.canaries, "an integer >= 2")
    scenario = load_target(args.scenario, cell=args.cell, sets=args.set)
    scenario = audit_scenario(
        scenario, canaries=args.canaries, clients=args.clients or None, seed=args.seed
    )
    t0 = time.perf_counter()
    if progress is not None:
        bar, on_row = progress(console, scenario.run.rounds)
        with bar:
            result = run_audit(scenario, out=args.out, on_row=on_row)
    else:
        result = run_audit(scenario, out=args.out)
    console.print(audit_table(result))
    console.print(
        f"audited clients {', '.join(result['clients'])} with {result['design']} canaries; "
        f"wall time {time.perf_counter() - t0:.1f}s; "
        f"audit: {result['run_dir']}/audit.json, audit.png"
    )
    return 0
