"""The audit run: an audited scenario through fedopt's normal run path, then its ε lower bounds.

:func:`audit_scenario` adds (or completes) the ``[audit]`` section of a
scenario or of one cell of a sweep file; :func:`run_audit` runs it with
:func:`fedopt.simulation.run`, so the audit measures exactly what fedopt
runs, and :func:`analyse_run` reads the run directory back: the canary
scores the server-side scorer wrote into ``summary.json``, the inclusion
vectors (drawn again from ``[audit] seed`` only now, after the scoring), the
bounds of :mod:`fedopt.privacy.audit`, and the ε each accountant reports for
the audited client's (σ, q, steps) ledger. It adds ``audit.json`` and
``audit.png`` to the run directory and changes nothing else there.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedopt.audit.canaries import AuditParams, audited_clients, inclusion
from fedopt.config import Scenario, apply_overrides, load_scenario, parse_scenario, read_toml
from fedopt.errors import ConfigError
from fedopt.privacy.audit import audit_scores

__all__ = [
    "analyse_run",
    "audit_scenario",
    "audit_summary",
    "load_target",
    "reported_epsilons",
    "run_audit",
]

_SWEEP_KEYS = ("base", "seeds", "scenario", "strategies", "settings")
ATTACKS = {"white_box": "white-box", "black_box": "black-box"}


def load_target(path: str | Path, *, cell: str | None = None, sets: Sequence[str] = ()) -> Scenario:
    """A scenario file, or one cell of a sweep file (its strategy label, or ``setting/label``).

    A sweep's cell runs with the sweep's first seed; ``sets`` apply on top of the cell.

    Raises
    ------
    ConfigError
        A missing or unknown cell (listing the labels), or any bad scenario value.
    """
    raw = read_toml(path)
    if not any(k in raw for k in _SWEEP_KEYS):
        if cell is not None:
            raise ConfigError("--cell", cell, "no --cell: the file is a scenario, not a sweep")
        return load_scenario(path, sets)
    from fedopt.compare import load_sweep

    sweep = load_sweep(path)
    seed = sweep.seeds[0]
    cells: dict[str, Scenario] = {}
    for strategy, setting, s, scenario in sweep.cells():
        if s == seed:
            cells[f"{setting.label}/{strategy.label}"] = scenario
            if len(sweep.settings) == 1:
                cells[strategy.label] = scenario
    if cell not in cells:
        raise ConfigError("--cell", cell, "a cell of the sweep: " + ", ".join(sorted(cells)))
    return parse_scenario(apply_overrides(cells[cell].to_dict(), sets))


def audit_scenario(
    scenario: Scenario,
    *,
    canaries: int | None = None,
    clients: Sequence[int] | None = None,
    seed: int | None = None,
) -> Scenario:
    """``scenario`` with an ``[audit]`` section, its audited clients named explicitly.

    Values given here replace the section's; the default client (the largest)
    is resolved now, so ``scenario.toml`` records who was audited.
    """
    section = dict(scenario.to_dict().get("audit", {}))
    for key, value in (("canaries", canaries), ("clients", clients), ("seed", seed)):
        if value is not None:
            section[key] = list(value) if key == "clients" else value
    raw = {**scenario.to_dict(), "audit": section}
    audited = parse_scenario(raw)
    params: AuditParams = audited.extras["audit"]
    if not params.clients:
        from fedopt.task import build_task

        section["clients"] = list(audited_clients(params, build_task(audited)))
        audited = parse_scenario({**raw, "audit": section})
    return audited


def reported_epsilons(summary: Mapping[str, Any], cid: int, *, delta: float) -> dict[str, float]:
    """ε of client ``cid``'s recorded (σ, q, steps) ledger by every registered accountant.

    Infinite for a non-private run; NaN where an accountant cannot evaluate the ledger.
    """
    from fedopt.privacy import accountant_names, make_accountant

    sample = summary.get("privacy", {}).get("sample_level", {})
    if sample.get("non_private"):
        return {name: math.inf for name in accountant_names()}
    h = sample.get("clients", {}).get(str(cid), {})
    history = [
        (float(s), float(q), int(n))
        for s, q, n in zip(h.get("sigma", []), h.get("q", []), h.get("steps", []), strict=True)
        if int(n) > 0
    ]
    out = {}
    for name in accountant_names():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. Opacus's "optimal order is the largest"
                out[name] = make_accountant(name, history=history).get_epsilon(delta)
        except Exception:  # noqa: BLE001  (an accountant outside its range: say so, go on)
            out[name] = math.nan
    return out


def audit_summary(summary: Mapping[str, Any], scenario: Scenario) -> dict[str, Any]:
    """The audit's results from a run's summary: bounds, guesses, reported ε, per client."""
    params: AuditParams = scenario.extras["audit"]
    delta = float(scenario.client.params.delta)
    clients = {}
    for key, scores in summary["audit"]["clients"].items():
        cid = int(key)
        inc = inclusion(params, cid)  # revealed only now, after the scoring
        row: dict[str, Any] = {
            "m": int(scores["m"]),
            "included": int(inc.sum()),
            "rounds": scores["rounds"],
            "reported_epsilon": reported_epsilons(summary, cid, delta=delta),
        }
        for attack in ATTACKS:
            bound = audit_scores(
                np.asarray(scores[attack]),
                inc,
                delta=delta,
                beta=params.beta,
                fractions=params.guess_fractions,
            )
            row[attack] = {
                "epsilon": bound.epsilon,
                "guesses": bound.guesses,
                "correct": bound.correct,
                "cap": bound.cap,
                "level": bound.level,
            }
        row["inclusion"] = "".join("1" if b else "0" for b in inc)
        clients[key] = row
    return {
        "method": summary["audit"]["method"],
        "scenario": scenario.name,
        "design": params.design,
        "delta": delta,
        "beta": params.beta,
        "guess_fractions": list(params.guess_fractions),
        "clients": clients,
    }


def analyse_run(run_dir: str | Path, *, wall_time: float | None = None) -> dict[str, Any]:
    """Read an audited run directory; write ``audit.json`` and ``audit.png`` beside its files."""
    from fedopt.audit.plot import plot_audit
    from fedopt.report import write_json_atomic

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    scenario = load_scenario(run_dir / "scenario.toml")
    if "audit" not in summary:
        raise ConfigError("run_dir", str(run_dir), "a run with an [audit] section")
    result = audit_summary(summary, scenario)
    if wall_time is not None:
        result["wall_time"] = wall_time
    result["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "audit.json", result)
    plot_audit(summary["audit"], result, run_dir / "audit.png")
    return result


def run_audit(
    scenario: Scenario,
    *,
    out: str | Path = "runs",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run an audited scenario through :func:`fedopt.simulation.run`, then :func:`analyse_run`."""
    from fedopt.simulation import run

    if "audit" not in scenario.extras:
        scenario = audit_scenario(scenario)
    t0 = time.perf_counter()
    result = run(scenario, out=out, on_row=on_row)
    return analyse_run(result.run_dir, wall_time=time.perf_counter() - t0)
