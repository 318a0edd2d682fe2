"""Seconds per round of one FedAvg job three ways, measured in the same process run.

The job: an MLP 64-128-10, 64 examples per client, one local epoch of SGD
(batch 32, lr 0.1), every client in every round, FedAvg.

1. floor:  a bare PyTorch loop in this process (load weights, train, average).
2. flower: stock Flower 1.41 FedAvg on ``run_simulation`` (Ray backend), with a
           ClientApp written the way Flower's examples write it (the model is
           built and the client's data made inside the train function).
3. fedopt: ``fedopt.run`` on the same job (Ray backend).

Engine start-up is excluded: the steady per-round time is the median of the
round durations after the first round. Ratios, not seconds, are the result:
these machines are noisy, so only numbers measured in the same run are compared.

Usage: python bench/overhead.py [--clients 10 100] [--rounds 6]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES, HIDDEN, CLASSES, PER_CLIENT, BATCH, LR = 64, 128, 10, 64, 32, 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(cid)
    y = rng.integers(0, CLASSES, PER_CLIENT)
    centers = np.random.default_rng(12345).normal(size=(CLASSES, FEATURES))
    x = centers[y] + rng.normal(size=(PER_CLIENT, FEATURES))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def local_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), BATCH):
        idx = perm[i : i + BATCH]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def floor(n: int, rounds: int) -> list[float]:
    """The compute floor: the same local training and averaging, no framework."""
    model = make_model()
    data = [client_data(c) for c in range(n)]
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        for cid, (x, y) in enumerate(data):
            model.load_state_dict(glob)
            local_epoch(model, x, y, seed=r * 100003 + cid)
            for k, v in model.state_dict().items():
                acc[k] += v
        glob = {k: v / n for k, v in acc.items()}
        times.append(time.perf_counter() - t0)
    return times


def flower(n: int, rounds: int) -> list[float]:
    """Stock Flower: FedAvg.start on run_simulation, example-style ClientApp."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    stamps: list[float] = []
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        cid = int(context.node_config["partition-id"])
        x, y = client_data(cid)
        local_epoch(model, x, y, seed=int(msg.content["config"]["server-round"]) * 100003 + cid)
        metrics = MetricRecord({"num-examples": len(x)})
        return Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
            reply_to=msg,
        )

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n)

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(
            grid, ArrayRecord(make_model().state_dict()), num_rounds=rounds, evaluate_fn=stamp
        )

    from fedopt.simulation import quiet_engine

    with tempfile.TemporaryDirectory() as tmp, quiet_engine(Path(tmp) / "flower.log"):
        run_simulation(
            server_app=server,
            client_app=client,
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


def fedopt_run(n: int, rounds: int, out: Path) -> list[float]:
    """fedopt on the same job."""
    from fedopt import parse_scenario, run

    scenario = parse_scenario(
        {
            "name": f"overhead{n}",
            "data": {
                "name": "blobs",
                "num_examples": n * PER_CLIENT * 5 // 4,
                "num_features": FEATURES,
                "num_classes": CLASSES,
            },
            "partition": {"name": "iid", "num_clients": n, "test_fraction": 0.0},
            "model": {"name": "mlp", "hidden": [HIDDEN]},
            "client": {"name": "sgd", "epochs": 1, "batch_size": BATCH, "lr": LR},
            "run": {"rounds": rounds, "eval_every": 0, "fed_eval_every": 0},
        }
    )
    result = run(scenario, out=out)
    walls = [r["wall_time"] for r in result.rows]
    return [b - a for a, b in zip(walls, walls[1:], strict=False)]


def steady(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 2 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            f = steady(floor(n, args.rounds))
            fl = steady(flower(n, args.rounds))
            fo = steady(fedopt_run(n, args.rounds, Path(tmp)))
            rows.append((n, f, fl, fo))
            print(
                f"N={n}: floor {f:.4f}s  flower {fl:.4f}s  fedopt {fo:.4f}s per round", flush=True
            )
    print()
    head = ("clients/round", "floor s/round", "stock Flower s/round", "fedopt s/round")
    print("| " + " | ".join((*head, "fedopt/floor", "Flower/fedopt")) + " |")
    print("|---|---|---|---|---|---|")
    for n, f, fl, fo in rows:
        print(f"| {n} | {f:.4f} | {fl:.4f} | {fo:.4f} | {fo / f:.1f}x | {fl / fo:.2f}x |")


if __name__ == "__main__":
    main()
