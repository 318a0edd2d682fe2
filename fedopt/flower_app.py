"""The Flower App entry points for ``flwr run .``: a ServerApp and a ClientApp read run_config.

``pyproject.toml`` declares them under ``[tool.flwr.app.components]`` with three
run-config keys: ``scenario`` (a path, absolute or relative to the app),
``set`` (``;``-separated ``key=value`` overrides) and ``out-dir`` (an absolute
directory for the run's files; empty means ``~/fedopt-runs``). The code that
``flwr run`` executes is a copy of the app, with the working directory of
whoever started the local SuperLink, so outputs go to absolute paths only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedopt.clientapp import make_client_app
from fedopt.config import apply_overrides, parse_scenario, read_toml
from fedopt.errors import ConfigError
from fedopt.simulation import execute_run, make_run_dir, write_scenario
from fedopt.task import build_task

__all__ = ["client_app", "scenario_mapping", "server_app"]

APP_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fedopt")


def scenario_mapping(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario mapping named by a run config (path + overrides).

    The ClientApp resolves it for every message, so the file is read once per
    (path, overrides) in a worker process; the app copy ``flwr run`` executes
    never changes under a run. Callers must not modify the returned mapping.
    """
    return _read_scenario(
        str(run_config.get("scenario") or "scenarios/quickstart.toml"),
        str(run_config.get("set", "")),
    )


@functools.lru_cache(maxsize=8)
def _read_scenario(scenario: str, sets: str) -> dict[str, Any]:
    path = Path(scenario)
    if not path.is_absolute():
        path = APP_ROOT / path
    overrides = [s.strip() for s in sets.split(";") if s.strip()]
    return apply_overrides(read_toml(path), overrides)


def output_root(run_config: Mapping[str, Any]) -> Path:
    """Where a ``flwr run`` writes its run directory."""
    out = str(run_config.get("out-dir", "") or "")
    if not out:
        return Path.home() / "fedopt-runs"
    if not Path(out).is_absolute():
        raise ConfigError("out-dir", out, "an absolute directory (flwr run has no stable cwd)")
    return Path(out)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    scenario = parse_scenario(scenario_mapping(context.run_config))
    if scenario.run.pack == "auto":  # the federation's nodes are the user's: one per client
        scenario = scenario.replace(**{"run.pack": "off"})
    task = build_task(scenario)
    run_dir = make_run_dir(output_root(context.run_config), scenario.name)
    write_scenario(run_dir, scenario)
    log.info("fedopt run directory: %s", run_dir)
    print(f"fedopt run directory: {run_dir}", flush=True)
    execute_run(grid, task, run_dir)


client_app = make_client_app(lambda context: {"": scenario_mapping(context.run_config)})
