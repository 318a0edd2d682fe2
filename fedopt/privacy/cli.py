"""The body of ``fedopt privacy``: ε of a step plan by every accountant, or σ for a target ε.

Bad arguments (a rate outside (0, 1], σ <= 0, an unknown accountant, ...) are
one :class:`~fedopt.errors.ConfigError` line before anything is computed (the
CLI exits 2). Each requested accountant then gives one row; a computation that
fails (an unreachable target, a library that cannot handle the plan) becomes
its row's one-line error, never a traceback, and makes the command exit 2.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from fedopt.errors import ConfigError, FedoptError
from fedopt.privacy.accountants import accountant_names, make_accountant
from fedopt.privacy.calibration import calibrate_noise, epsilon_for

__all__ = ["privacy_command", "privacy_rows"]

#: Exit status when a requested row failed (bad input, as elsewhere in the CLI).
FAILED = 2


def _positive(key: str, value: float | None, what: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(key, value, f"a finite {what} > 0")


def _check_args(
    sample_rate: float,
    steps: int,
    delta: float,
    noise_multiplier: float | None,
    target_epsilon: float | None,
) -> None:
    """One ConfigError (key, value, what is allowed) for the first bad argument."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(
            "--sigma", noise_multiplier, "exactly one of --sigma and --target-epsilon"
        )
    _positive("--sigma", noise_multiplier, "noise multiplier σ")
    _positive("--target-epsilon", target_epsilon, "target ε")
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError("--q", sample_rate, "a sampling rate in (0, 1]")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigError("--steps", steps, "an integer >= 1")
    if not 0.0 < delta < 1.0:
        raise ConfigError("--delta", delta, "a probability in (0, 1)")


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a library's own error keeps its type's name)."""
    text = " ".join(str(err).split()) or "no message"
    return text if isinstance(err, FedoptError) else f"{type(err).__name__}: {text}"


def _row(name: str, sample_rate: float, steps: int, delta: float, **ask: Any) -> dict[str, Any]:
    """One accountant's row: its σ and ε, or the computation's one-line error."""
    row: dict[str, Any] = {"accountant": name}
    try:
        sigma = ask["noise_multiplier"]
        if sigma is None:
            sigma = calibrate_noise(
                target_epsilon=float(ask["target_epsilon"]),
                delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=name,
                key="--target-epsilon",
            )
        row["sigma"] = sigma
        row["epsilon"] = epsilon_for(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=name,
        )
    except Exception as err:  # noqa: BLE001 (a row reports whatever its library raised)
        row.pop("sigma", None)
        row["error"] = _one_line(err)
    return row


def privacy_rows(
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountants: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per accountant: ``{"accountant", "sigma", "epsilon"}``, or ``"error"`` for σ and ε.

    With ``noise_multiplier``: ε of ``steps`` Poisson-Gaussian steps. With
    ``target_epsilon``: the calibrated σ and the ε it actually gives. ε is
    never below 0 (:meth:`~fedopt.privacy.accountants.Accountant.get_epsilon`).

    Raises
    ------
    ConfigError
        For a bad argument (named as its command-line option), before any row.
    """
    _check_args(sample_rate, steps, delta, noise_multiplier, target_epsilon)
    names = accountants or accountant_names()
    for name in names:
        make_accountant(name, key="--accountant")
    return [
        _row(
            name,
            float(sample_rate),
            int(steps),
            float(delta),
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
        )
        for name in names
    ]


def privacy_command(args: argparse.Namespace, console: Any) -> int:
    """Print the accountants side by side for the plan; 2 when any row failed, else 0."""
    from rich.table import Table

    rows = privacy_rows(
        sample_rate=args.q,
        steps=args.steps,
        delta=args.delta,
        noise_multiplier=args.sigma,
        target_epsilon=args.target_epsilon,
        accountants=args.accountant or None,
    )
    plan = f"{args.steps} steps, q = {args.q:g}, δ = {args.delta:g}"
    if args.sigma is not None:
        console.print(f"ε after {plan}, σ = {args.sigma:g}", markup=False)
    else:
        console.print(f"σ for ε = {args.target_epsilon:g} after {plan}", markup=False)
    table = Table()
    for col in ("accountant", "σ", "ε"):
        table.add_column(col, justify="left" if col == "accountant" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["accountant"], "-", "failed (below)")
        else:
            table.add_row(row["accountant"], f"{row['sigma']:.4f}", f"{row['epsilon']:.4f}")
    console.print(table)
    show = {"markup": False, "highlight": False, "soft_wrap": True}
    for row in rows:
        if "error" in row:
            console.print(f"{row['accountant']} failed: {row['error']}", **show)
    if any(row.get("epsilon") == 0.0 for row in rows):
        console.print(
            "ε = 0: at this δ the plan loses nothing beyond δ itself "
            "(an accountant's negative ε is reported as 0).",
            **show,
        )
    if any(r["accountant"] == "gdp" for r in rows):
        console.print("gdp is Opacus's experimental CLT approximation: it can underestimate ε.")
    return FAILED if any("error" in row for row in rows) else 0
