"""Builds the ServerApp and ClientApp of a scenario and runs them on Flower's Ray engine.

:func:`run` is the Python API (``fedopt.run``) behind ``fedopt run``: it
validates the scenario, creates the run directory, builds the task while Ray
and its warm workers start (:mod:`fedopt.startup`; bad input found then still
fails before round 1 and leaves no run directory), runs Flower's simulation
engine with the Ray backend, and returns a :class:`RunResult`.
:func:`execute_run` is the ServerApp body shared with the ``flwr run`` entry
point (:mod:`fedopt.flower_app`): it streams metrics rows to ``metrics.jsonl``
as rounds finish and always writes the summary, even when the run fails, so
nothing already measured is lost.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedopt import engine, ray_backend, watchdog
from fedopt.checkpoint import Checkpoint, StopRequest, latest_checkpoint, stop_on_signals
from fedopt.clientapp import make_client_app
from fedopt.config import Scenario, load_scenario
from fedopt.divergence import check_blowup
from fedopt.errors import (
    ConfigError,
    DivergenceError,
    RunInterrupted,
    StorageError,
    is_storage_fault,
)
from fedopt.model_out import MODEL_FINAL, BestModel, save_model
from fedopt.privacy.secrecy import NoiseKey, wants_secret
from fedopt.ray_address import check_reachable
from fedopt.registry import STRATEGIES
from fedopt.report import MetricsLog, read_metrics, write_run_files
from fedopt.resumable import Checkpointer
from fedopt.runlock import run_lock
from fedopt.server import RoundDriver
from fedopt.startup import Startup, start_federation
from fedopt.task import Task
from fedopt.transport import pack_plan

__all__ = ["RunResult", "execute_run", "load_result", "make_run_dir", "run", "run_batch"]

Row = dict[str, Any]


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced: its directory, per-round rows and summary."""

    run_dir: Path
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        """The last measured accuracy (central when available, else federated)."""
        return self.summary.get("final_accuracy")

    def model(self, which: str = "final") -> torch.nn.Module:
        """The run's trained model, rebuilt and loaded: ``final`` or ``best`` (central accuracy)."""
        from fedopt.model_out import load_model

        return load_model(self.run_dir, which)[0]

    def __repr__(self) -> str:  # the rows are many; say how many, not what
        status = self.summary.get("status", "?")
        acc = self.final_accuracy
        shown = "None" if acc is None else f"{acc:.4f}"
        return (
            f"RunResult(run_dir={str(self.run_dir)!r}, rows={len(self.rows)}, "
            f"status={status!r}, final_accuracy={shown})"
        )


def versions() -> dict[str, str]:
    """Versions of the packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("fedopt", "flwr", "ray", "torch", "opacus", "numpy", "flwr-datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def make_run_dir(out: Path, name: str) -> Path:
    """Create ``out/<name>/<timestamp>`` (suffixed when taken) and return it.

    The directory is claimed by ``mkdir`` itself, so two runs started in the
    same second never share one. An ``out`` that cannot hold it (a file, a
    read-only or full file system, no permission) is a one-line ConfigError.
    """
    base = Path(out).expanduser().resolve() / name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if not path.is_dir():  # a file stands where a directory is needed
                file = next(p for p in (path, *path.parents) if p.exists() and not p.is_dir())
                raise ConfigError("--out", str(out), f"a directory; {file} is a file") from None
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as err:  # read-only, no permission, a file in the path, disk full
            raise ConfigError(
                "--out", str(out), f"a directory fedopt can create and write ({err.strerror})"
            ) from None


def write_scenario(run_dir: Path, scenario: Scenario) -> Path:
    """Write the resolved scenario next to the run's results."""
    path = run_dir / "scenario.toml"
    path.write_text(tomli_w.dumps(scenario.to_dict()))
    return path


def execute_run(
    grid: Grid,
    task: Task,
    run_dir: Path,
    *,
    run_key: str = "",
    on_row: Callable[[Row], None] | None = None,
    restore: Checkpoint | None = None,
    stop: StopRequest | None = None,
    noise_key: NoiseKey | None = None,
    before: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The ServerApp body of one run: every round, streamed metrics, checkpoints, the run's files.

    The server loop is :class:`~fedopt.server.RoundDriver` unless the strategy's
    registered factory names another one in its ``driver`` attribute (a class
    with the same constructor, ``run(grid)`` and ``summary_extra()``), as
    asynchronous or decentralized methods do. ``restore`` continues from a
    checkpoint (its rows are already in ``metrics.jsonl``); ``stop`` is the
    request a signal sets to end the run after its round, with a checkpoint.
    ``noise_key`` is the run's secret key (``noise = "secret"``), the one its
    clients got: the driver binds it to the strategy for server-side noise and
    the checkpoints keep it, so a resumed run draws the same noise.
    ``before`` runs first, once the engine is up (a resume writes its record then).
    """
    if before is not None:
        before()
    rows: list[Row] = list(restore.payload["rows"]) if restore is not None else []
    status = "completed"
    pending: BaseException | None = None  # the error stopping the run, if one is
    t0 = time.perf_counter()
    driver: RoundDriver | None = None
    best = BestModel(run_dir, task.scenario, rows)
    with MetricsLog(run_dir / "metrics.jsonl") as mlog:

        def emit(row: Row) -> None:
            mlog.append(row)
            rows.append(row)
            seen = driver.last_eval if driver is not None else None
            if seen is not None and seen[0] == row.get("central_accuracy"):
                best.offer(row, seen[1].to_torch_state_dict)
            if on_row is not None:
                on_row(row)
            run = task.scenario.run  # a blown-up loss stops the run, its rows kept
            check_blowup(rows, factor=run.diverge_factor, rounds=run.diverge_rounds)

        try:
            entry = STRATEGIES.get(task.scenario.strategy.name, key="strategy.name")
            driver_cls = getattr(entry.obj, "driver", RoundDriver)
            driver = driver_cls(task, emit=emit, run_key=run_key)
            driver.checkpointer = Checkpointer(run_dir, rows, stop=stop)
            driver.restored = restore.payload if restore is not None else None
            driver.bind_noise_key(noise_key)
            final = driver.run(grid)
            last = rows[-1] if rows else {}
            save_model(
                run_dir / MODEL_FINAL,
                final.to_torch_state_dict(),
                scenario=task.scenario,
                round_=int(last.get("round", 0)),
                accuracy=last.get("central_accuracy"),
            )
        except RunInterrupted as err:
            status = f"interrupted: {err}"
            pending = err
            raise
        except BaseException as err:
            # a full or read-only disk is one line naming the file, not a traceback
            failure = StorageError(run_dir, err) if is_storage_fault(err) else err
            status, pending = f"failed: {failure}", failure
            newest = latest_checkpoint(run_dir) if isinstance(err, Exception) else None
            if newest is not None:
                failure.add_note(
                    f"newest checkpoint: round {newest.round}; continue from it with: "
                    f"fedopt resume {run_dir}"
                )
            if failure is err:
                raise
            raise failure from err
        finally:
            s = task.scenario
            devices = sorted(driver.client_devices) if driver else []
            extra = {
                "scenario": s.name,
                "fingerprint": s.fingerprint(),
                "status": status,
                "seed": s.run.seed,
                "strategy": s.strategy.name,
                "client": s.client.name,
                "num_clients": task.num_clients,
                "client_device": "+".join(devices) or "none",
                "wall_time": time.perf_counter() - t0,
                "versions": versions(),
                **(driver.summary_extra() if driver is not None else {}),
            }
            try:
                write_run_files(run_dir, rows, extra=extra)
            except OSError as err:
                if not is_storage_fault(err):
                    raise
                if pending is None:
                    raise StorageError(run_dir, err) from err
                pending.add_note(f"summary.json and metrics.csv not rewritten: {err.strerror}")
    return extra


@contextmanager
def quiet_engine(log_path: Path) -> Iterator[None]:
    """Send Flower's and fedopt's log records to ``log_path`` instead of the terminal.

    Warnings about stopping (a Ctrl-C or SIGTERM was received) still reach
    the terminal.
    """
    handler = logging.FileHandler(log_path)
    shout = logging.StreamHandler()
    shout.setLevel(logging.WARNING)
    shout.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("fedopt.checkpoint").addHandler(shout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in ("flwr", "fedopt", "ray"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
        if name == "fedopt":
            logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.removeHandler(handler)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
            logger.setLevel(level)
        logging.getLogger("fedopt.checkpoint").removeHandler(shout)
        handler.close()


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """Flower's Ray backend settings for a scenario (client resources, Ray start-up)."""
    r = scenario.run
    init: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if r.ray_address:
        init["address"] = r.ray_address
    elif r.workers is not None:
        init["num_cpus"] = r.workers * r.num_cpus
        init["num_gpus"] = torch.cuda.device_count()
    return {
        "client_resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "init_args": init,
    }


def _check_resources(scenarios: Sequence[Scenario]) -> None:
    first = scenarios[0].run
    for sc in scenarios[1:]:
        for key in ("num_cpus", "num_gpus", "workers", "ray_address"):
            if getattr(sc.run, key) != getattr(first, key):
                raise ConfigError(
                    f"run.{key}",
                    getattr(sc.run, key),
                    f"the same value in every run of a batch "
                    f"({getattr(first, key)!r}): they share one federation",
                )
    check_reachable(first.ray_address, timeout=first.connect_timeout)
    if first.num_gpus > 0 and not first.ray_address and not torch.cuda.is_available():
        raise ConfigError(
            "run.num_gpus",
            first.num_gpus,
            "0 on this machine: it has no CUDA GPU (or use --ray-address)",
        )


def load_result(run_dir: Path) -> RunResult:
    """Read a finished run directory back into a :class:`RunResult`."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return RunResult(run_dir=run_dir, rows=read_metrics(run_dir), summary=summary)


def run_noise_key(scenario: Scenario, checkpoint: Checkpoint | None) -> NoiseKey | None:
    """The run's secret key: the checkpoint's when resuming, a new one for a secret run, or None.

    Raises
    ------
    ConfigError
        When a secret run's checkpoint holds no key (it cannot resume exactly).
    """
    if not wants_secret(scenario):
        return None
    if checkpoint is None:
        return NoiseKey.new()
    raw = checkpoint.payload.get("noise_key")
    if raw is None:
        raise ConfigError(
            "noise",
            "secret",
            "a checkpoint written by a secret run (this one has no key: resume with --set "
            'client.noise="replayable" (or user_dp.noise) and --force, or start over)',
        )
    return NoiseKey(raw)


def _timed_row(clock: Startup, i: int, on_row: Callable[[int, Row], None] | None, row: Row) -> None:
    if row.get("round") in (0, 1):  # the start-up timeline ends with round 1
        clock.mark(f"round_{row['round']}")
    if on_row is not None:
        on_row(i, row)


def run_batch(
    scenarios: Sequence[Scenario],
    run_dirs: Sequence[Path],
    *,
    on_row: Callable[[int, Row], None] | None = None,
    on_done: Callable[[int, RunResult], None] | None = None,
    tasks: Sequence[Task] | None = None,
    restore: Sequence[Checkpoint | None] | None = None,
    on_diverged: Callable[[int, DivergenceError], None] | None = None,
    before: Sequence[Callable[[], None] | None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run several scenarios one after another in ONE Flower simulation (one Ray start-up).

    The federation has as many nodes as the largest run needs (one per
    client, or ``run.pack_nodes`` when packed); each message names its run,
    so client workers build each run's task once and keep every run's client
    state apart. Results are identical to running the
    scenarios one by one. All runs must ask for the same client resources.
    ``tasks`` are the scenarios' already built tasks, when the caller has them;
    ``restore`` gives a checkpoint to continue from per scenario (or None).
    With ``on_diverged``, a run whose training diverges is reported there and
    the batch goes on with the next run (a rate grid expects some to); without
    it, the divergence stops the batch. ``before`` gives a run a hook that runs
    once the engine is up, instead of writing its ``scenario.toml`` up front
    (a resume writes its scenario, record and cut metrics there).
    ``on_status`` hears what start-up is doing until the first round runs.
    Ctrl-C or SIGTERM stops the run in progress after its round with a
    checkpoint (:class:`~fedopt.errors.RunInterrupted`); a second one stops at once.
    """
    from flwr.simulation import run_simulation

    if not scenarios or len(scenarios) != len(run_dirs):
        raise ValueError("run_batch needs one run directory per scenario")
    _check_resources(scenarios)
    clock = Startup.begin()
    tasks = list(tasks) if tasks is not None else [None] * len(scenarios)
    keys = [f"{i}-{sc.fingerprint()}" for i, sc in enumerate(scenarios)]
    hooks = list(before) if before is not None else [None] * len(scenarios)
    with ExitStack() as held:
        for sc, run_dir, hook in zip(scenarios, run_dirs, hooks, strict=True):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            held.enter_context(run_lock(run_dir))  # another process writing it: one line, here
            if hook is None:
                write_scenario(Path(run_dir), sc)
        raws = {k: sc.to_dict() for k, sc in zip(keys, scenarios, strict=True)}
        outcome: dict[str, BaseException] = {}
        results: list[RunResult] = []
        restores = list(restore) if restore is not None else [None] * len(scenarios)
        noise_keys = {
            k: nk
            for k, sc, ckpt in zip(keys, scenarios, restores, strict=True)
            if (nk := run_noise_key(sc, ckpt)) is not None
        }
        stop = StopRequest()
        say = on_status or (lambda text: None)

        server_app = ServerApp()
        federation: dict[str, Any] = {}

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            clock.mark("federation")
            say("federation up: sending the first round to the clients")
            try:
                serve(grid)
            finally:  # the workers are still up: ask when they were warm
                ready = federation["warm"].ready_times()
                if ready:
                    clock.mark("actors_warm", max(ready))

        def serve(grid: Grid) -> None:
            for i, (task, run_dir, key) in enumerate(zip(tasks, run_dirs, keys, strict=True)):
                row_cb = functools.partial(_timed_row, clock, i, on_row)
                try:
                    execute_run(
                        grid,
                        task,
                        Path(run_dir),
                        run_key=key,
                        on_row=row_cb,
                        restore=restores[i],
                        stop=stop,
                        noise_key=noise_keys.get(key),
                        before=hooks[i],
                    )
                except DivergenceError as err:
                    if on_diverged is None:
                        outcome["error"] = err
                        return
                    on_diverged(i, err)
                    continue
                except BaseException as err:
                    outcome["error"] = err
                    return
                results.append(load_result(Path(run_dir)))
                if on_done is not None:
                    on_done(i, results[-1])

        client_app = make_client_app(lambda context: raws, noise_keys=noise_keys)
        env = {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        ray_backend.install()  # replace Ray workers that die instead of reusing them
        if not scenarios[0].run.ray_address:  # a local Ray: none of it may outlive us
            watchdog.ensure()
        engine.install()  # event-driven dispatch instead of 0.1 s polling sweeps
        try:
            with quiet_engine(Path(run_dirs[0]) / "engine.log"), stop_on_signals(stop):
                say("starting Ray and its workers (they import torch) while the task is built")
                warm = federation["warm"] = start_federation(scenarios, tasks, clock)
                try:
                    nodes = max(
                        pack_plan(sc, num_clients=t.num_clients).nodes
                        for sc, t in zip(scenarios, tasks, strict=True)
                    )
                    say(f"starting the federation: {nodes} Flower nodes")
                    run_simulation(
                        server_app=server_app,
                        client_app=client_app,
                        num_supernodes=nodes,
                        backend_name="ray",
                        backend_config=backend_config(scenarios[0]),
                    )
                finally:
                    warm.close()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        clock.write(Path(run_dirs[0]))
        if "error" in outcome:
            raise outcome["error"]
        return results


def run(
    scenario: Scenario | str | Path,
    *,
    sets: Sequence[str] = (),
    out: str | Path = "runs",
    run_dir: Path | None = None,
    ray_address: str | None = None,
    on_row: Callable[[Row], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> RunResult:
    """Run a scenario on Flower's simulation engine (Ray backend) and return its results.

    Parameters
    ----------
    scenario : Scenario or path
        A validated scenario or the path of a scenario file.
    sets : sequence of str
        ``key=value`` overrides (only with a path).
    out : path
        Parent of the run directory ``<out>/<scenario name>/<timestamp>``.
    run_dir : Path, optional
        Use this directory instead.
    ray_address : str, optional
        Join an existing Ray cluster instead of starting a local one.
    on_row : callable, optional
        Called with each metrics row as its round ends (progress display).
    on_status : callable, optional
        Called with a line saying what start-up is doing (task, Ray, first round).
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, sets)
    if ray_address:
        scenario = scenario.replace(**{"run.ray_address": ray_address})
    _check_resources([scenario])
    if on_status is not None:
        on_status("building the task (data, partition, model) while Ray starts")
    made = run_dir is None
    run_dir = Path(run_dir) if run_dir is not None else make_run_dir(Path(out), scenario.name)
    cb = (lambda i, row: on_row(row)) if on_row is not None else None
    try:
        return run_batch([scenario], [run_dir], on_row=cb, on_status=on_status)[0]
    except ConfigError:  # bad input found while the task was built: leave no run behind
        if made and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
