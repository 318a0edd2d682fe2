"""The body of ``fedopt privacy``: ε of a step plan by every accountant, or σ for a target ε."""

from __future__ import annotations

import argparse
from typing import Any

from fedopt.errors import ConfigError
from fedopt.privacy.accountants import PrivacyError, accountant_names, make_accountant
from fedopt.privacy.calibration import calibrate_noise, epsilon_for

__all__ = ["privacy_command", "privacy_rows"]


def privacy_rows(
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountants: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per accountant: ``{"accountant", "sigma", "epsilon"}`` (or ``"error"``).

    With ``noise_multiplier``: ε of ``steps`` Poisson-Gaussian steps. With
    ``target_epsilon``: the calibrated σ and the ε it actually gives.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(
            "--sigma", noise_multiplier, "exactly one of --sigma and --target-epsilon"
        )
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError("--q", sample_rate, "a sampling rate in (0, 1]")
    if steps < 1:
        raise ConfigError("--steps", steps, "an integer >= 1")
    if not 0.0 < delta < 1.0:
        raise ConfigError("--delta", delta, "a probability in (0, 1)")
    names = accountants or accountant_names()
    for name in names:
        make_accountant(name, key="--accountant")
    rows = []
    for name in names:
        row: dict[str, Any] = {"accountant": name}
        try:
            sigma = noise_multiplier
            if sigma is None:
                sigma = calibrate_noise(
                    target_epsilon=float(target_epsilon),
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
        except (PrivacyError, ConfigError) as err:
            row["error"] = str(err)
        rows.append(row)
    return rows


def privacy_command(args: argparse.Namespace, console: Any) -> int:
    """Print the accountants side by side for the plan on the command line."""
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
        console.print(f"ε after {plan}, σ = {args.sigma:g}")
    else:
        console.print(f"σ for ε = {args.target_epsilon:g} after {plan}")
    table = Table()
    for col in ("accountant", "σ", "ε"):
        table.add_column(col, justify="left" if col == "accountant" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["accountant"], "-", row["error"])
        else:
            table.add_row(row["accountant"], f"{row['sigma']:.4f}", f"{row['epsilon']:.4f}")
    console.print(table)
    if any(r["accountant"] == "gdp" for r in rows):
        console.print("gdp is Opacus's experimental CLT approximation: it can underestimate ε.")
    return 0
