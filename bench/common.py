"""The benchmark job that bench/overhead.py and bench/profile.py share, and its runners.

The job: an MLP 64-128-10, 64 examples per client, one local epoch of SGD
(batch 32, lr 0.1), every client in every round, FedAvg. It runs four ways:

- :func:`floor1`: a bare PyTorch loop in one process (load weights, train, average);
- :func:`floor2`: the same loop on two persistent worker processes, the
  strictest bare floor that uses as many cores as the simulations do;
- :func:`run_flower`: stock Flower 1.41 FedAvg on ``run_simulation`` (Ray), with
  a ClientApp written the way Flower's examples write it (the model is built
  and the client's data made inside the train function);
- :func:`run_fedopt`: ``fedopt.run`` on the same job (Ray).

Every runner returns the wall-clock duration of each round after the first
one started, so engine start-up is never counted; :func:`steady` takes the
median of the rounds after the first. Run the two Ray runners through
:func:`isolated` (a fresh process each): fedopt patches Flower's engine and
array codec in the process it runs in.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FEATURES, HIDDEN, CLASSES, PER_CLIENT, BATCH, LR = 64, 128, 10, 64, 32, 0.1

#: Seconds of a round, one per round.
Times = list[float]


def make_model() -> nn.Module:
    """The job's model, identically initialised every time."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``cid``'s 64 examples: Gaussian blobs around fixed class centres."""
    rng = np.random.default_rng(cid)
    y = rng.integers(0, CLASSES, PER_CLIENT)
    centers = np.random.default_rng(12345).normal(size=(CLASSES, FEATURES))
    x = centers[y] + rng.normal(size=(PER_CLIENT, FEATURES))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def local_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """One shuffled pass of minibatch SGD over ``(x, y)``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), BATCH):
        idx = perm[i : i + BATCH]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def round_seed(server_round: int, cid: int) -> int:
    """The seed of client ``cid``'s shuffling in ``server_round``."""
    return server_round * 100003 + cid


def train_clients(
    model: nn.Module,
    data: list[tuple[int, torch.Tensor, torch.Tensor]],
    glob: dict[str, torch.Tensor],
    server_round: int,
) -> dict[str, torch.Tensor]:
    """Train each ``(cid, x, y)`` from ``glob`` in turn; the sum of their final weights."""
    acc = {k: torch.zeros_like(v) for k, v in glob.items()}
    for cid, x, y in data:
        model.load_state_dict(glob)
        local_epoch(model, x, y, seed=round_seed(server_round, cid))
        for k, v in model.state_dict().items():
            acc[k] += v
    return acc


def floor1(n: int, rounds: int) -> Times:
    """The compute floor on one core: the same local training and averaging, no framework."""
    model = make_model()
    data = [(c, *client_data(c)) for c in range(n)]
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        acc = train_clients(model, data, glob, r)
        glob = {k: v / n for k, v in acc.items()}
        times.append(time.perf_counter() - t0)
    return times


def _floor_worker(conn: Any, cids: list[int]) -> None:
    """A floor2 process: build its clients' data and a model once, then serve rounds."""
    torch.set_num_threads(1)
    model = make_model()
    data = [(c, *client_data(c)) for c in cids]
    conn.send("ready")
    while (job := conn.recv()) is not None:
        server_round, weights = job
        glob = {k: torch.from_numpy(v) for k, v in weights.items()}
        acc = train_clients(model, data, glob, server_round)
        conn.send({k: v.numpy() for k, v in acc.items()})


def floor2(n: int, rounds: int, *, procs: int = 2) -> Times:
    """The compute floor on ``procs`` cores: persistent spawned workers, one share of clients each.

    The workers start (and build their data) before timing. Per round the
    parent sends the global weights, each worker trains its clients in id
    order and returns the sum of their weights, and the parent averages.
    """
    ctx = mp.get_context("spawn")
    shares = np.array_split(np.arange(n), procs)
    pipes, workers = [], []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_floor_worker, args=(child, share.tolist()), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    try:
        for pipe in pipes:
            pipe.recv()
        glob = {k: v.numpy().copy() for k, v in make_model().state_dict().items()}
        times = []
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            for pipe in pipes:
                pipe.send((r, glob))
            sums = [pipe.recv() for pipe in pipes]
            glob = {k: sum(s[k] for s in sums) / n for k in glob}
            times.append(time.perf_counter() - t0)
        return times
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in workers:
            proc.join(timeout=10)


def assert_stock_flower() -> None:
    """Raise if fedopt has patched Flower in this process (its simulations do, for good).

    fedopt's runs swap in their own Ray backend, message dispatcher and array
    codec; stock Flower measured after one in the same process would not be stock.
    """
    from flwr.app import Array
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    parts = (vce_api.add_messages_to_queue, raybackend.RayBackend, Array.numpy)
    if any(getattr(p, "__module__", "").startswith("fedopt") for p in parts):
        raise RuntimeError("fedopt has patched Flower in this process: run stock Flower isolated")


def _quietly(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    with quiet():
        return fn(*args)


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned interpreter, so that no run sees another's patches."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_quietly, fn, args).result()


def flower_client_app() -> Any:
    """Stock Flower's ClientApp for the job, written as Flower's examples write it."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        cid = int(context.node_config["partition-id"])
        x, y = client_data(cid)
        local_epoch(model, x, y, seed=round_seed(int(msg.content["config"]["server-round"]), cid))
        metrics = MetricRecord({"num-examples": len(x)})
        return Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
            reply_to=msg,
        )

    return app


def run_flower(
    n: int,
    rounds: int,
    *,
    wrap: Callable[[Any], Any] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> Times:
    """Stock Flower: FedAvg.start on run_simulation (Ray), the example-style ClientApp.

    ``wrap`` may replace the ClientApp (profiling); ``on_round(r)`` is called in
    the ServerApp thread when round ``r`` ends (``r = 0``: before round 1).
    """
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedopt.simulation import quiet_engine

    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n)

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())
            if on_round is not None:
                on_round(server_round)

        strategy.start(
            grid, ArrayRecord(make_model().state_dict()), num_rounds=rounds, evaluate_fn=stamp
        )

    client = flower_client_app()
    assert_stock_flower()
    with tempfile.TemporaryDirectory() as tmp, quiet_engine(Path(tmp) / "flower.log"):
        run_simulation(
            server_app=server,
            client_app=wrap(client) if wrap is not None else client,
            num_supernodes=n,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {
                    "include_dashboard": False,
                    "log_to_driver": False,
                    "logging_level": logging.ERROR,
                },
            },
        )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def fedopt_raw(
    n: int, rounds: int, *, client: dict[str, Any] | None = None, **run: Any
) -> dict[str, Any]:
    """The job as a fedopt scenario mapping; ``client`` replaces the sgd client section."""
    return {
        "name": f"overhead{n}",
        "data": {
            "name": "blobs",
            "num_examples": n * PER_CLIENT * 5 // 4,
            "num_features": FEATURES,
            "num_classes": CLASSES,
        },
        "partition": {"name": "iid", "num_clients": n, "test_fraction": 0.0},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "client": client or {"name": "sgd", "epochs": 1, "batch_size": BATCH, "lr": LR},
        "run": {"rounds": rounds, "eval_every": 0, "fed_eval_every": 0, **run},
    }


def fedopt_scenario(raw: dict[str, Any]) -> Any:
    """The scenario, or None when this fedopt does not know one of its ``run`` keys."""
    from fedopt import parse_scenario
    from fedopt.errors import ConfigError

    try:
        return parse_scenario(raw)
    except ConfigError as err:
        if str(err.key).startswith("run.") and str(err.key)[4:] in raw["run"]:
            return None
        raise


def run_fedopt(
    raw: dict[str, Any], out: Path, *, on_row: Callable[[dict], None] | None = None
) -> Times | None:
    """``fedopt.run`` on a scenario mapping; each round's duration from its metrics rows.

    None when this fedopt does not know one of the mapping's ``run`` keys.
    """
    from fedopt import run

    scenario = fedopt_scenario(raw)
    if scenario is None:
        return None
    result = run(scenario, out=out, on_row=on_row)
    walls = [r["wall_time"] for r in result.rows]
    return [b - a for a, b in zip(walls, walls[1:], strict=False)]


def steady(times: Times) -> float:
    """The steady seconds per round: the median of the rounds after the first."""
    return statistics.median(times[1:] if len(times) > 2 else times)


@contextmanager
def quiet() -> Iterator[None]:
    """One thread per process, and no warnings or Flower log lines on the terminal."""
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
