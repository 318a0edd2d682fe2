"""The bench job on Apple's pfl-research 0.6 (PyTorch backend), its launcher and its check.

The job is bench/common.py's: an MLP 64-128-10 initialised by
``common.make_model``, client ``c``'s 64 examples from ``common.client_data(c)``,
one local epoch of SGD (batch 32, lr 0.1), every client in every round, FedAvg.
On pfl that is a ``FederatedDataset`` over users ``0..N-1`` sampled with
``MinimizeReuseUserSampler`` (cohort N: every user once per round), a
``SimulatedBackend``, ``FederatedAveraging`` and a ``PyTorchModel`` whose
central optimizer is SGD with lr 1 (the averaged model difference is applied
as is, which is FedAvg).

pfl's local training walks a user's ``Dataset`` in stored order
(``Dataset.iter`` slices ``raw_data`` into consecutive batches, no shuffling),
so the user's dataset function hands it the user's examples already permuted
by the floor's permutation for that round (``common.round_seed``): the batches
are the floor's, in the floor's order.

Under ``torchrun`` pfl's ``PyTorchDistributedContext`` takes rank and world
size from the launcher's environment (``RANK``, ``WORLD_SIZE``) and starts a
gloo process group; each worker trains the cohort positions ``i`` with
``i % world_size == rank`` (users 0, 2, 4, ... and 1, 3, 5, ... with 2
workers), and the workers all-reduce the summed model differences.

Run as a script (rank 0 prints ``{"times": [...], ...}`` as its last stdout line)::

    python bench/pfl_job.py --clients 100 --rounds 6 [--weights PATH.npz]
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/pfl_job.py ...

bench/overhead.py does that through :func:`launch` and compares the final
weights with :func:`floor_weights` (:func:`max_abs_diff`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from torch import nn

#: What the pfl rows need, and how to get it.
INSTALL_HINT = (
    "pfl-research rows skipped: pfl is not installed in {python}; `make bench` sets up "
    ".venv-bench with it (or: pip install torch==2.13.0 -e '.[dev,bench]' in a venv of its own, "
    "pfl 0.6 needs dp-accounting<0.6)"
)


class PflMLP(nn.Sequential):
    """The job's MLP with the ``loss`` and ``metrics`` methods pfl's ``PyTorchModel`` calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        from pfl.metrics import Weighted

        loss = nn.functional.cross_entropy(self(x), y, reduction="sum").item()
        return {"loss": Weighted(loss, len(x))}


def pfl_model() -> PflMLP:
    """The job's model as a :class:`PflMLP`, with ``common.make_model``'s initial weights."""
    model = PflMLP(
        nn.Linear(common.FEATURES, common.HIDDEN),
        nn.ReLU(),
        nn.Linear(common.HIDDEN, common.CLASSES),
    )
    model.load_state_dict(common.make_model().state_dict())
    return model


def run_pfl(n: int, rounds: int) -> tuple[list[float], dict[str, np.ndarray], int]:
    """The job on pfl in this process (one worker of a torchrun job, or alone).

    Returns each round's duration (from the end of the previous one; the first
    from the start of training), the final weights, and pfl's world size.
    """
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    data = {c: common.client_data(c) for c in range(n)}
    made = dict.fromkeys(data, 0)

    def make_dataset(cid: int) -> Dataset:
        made[cid] += 1  # every user once per round: this is the round
        g = torch.Generator().manual_seed(common.round_seed(made[cid], cid))
        perm = torch.randperm(common.PER_CLIENT, generator=g)
        x, y = data[cid]
        return Dataset((x[perm], y[perm]), user_id=cid)

    stamps: list[float] = []

    class Stamps(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Metrics:
            stamps.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
        ) -> tuple[bool, Metrics]:
            stamps.append(time.perf_counter())
            return False, Metrics()

    module = pfl_model()
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    users = FederatedDataset(make_dataset, MinimizeReuseUserSampler(list(range(n))))
    backend = SimulatedBackend(training_data=users, val_data=users)
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=rounds,
        evaluation_frequency=rounds + 1,  # pfl evaluates at iteration 0 only
        train_cohort_size=n,
        val_cohort_size=None,
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=1, local_learning_rate=common.LR, local_batch_size=common.BATCH
    )
    FederatedAveraging().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        callbacks=[Stamps()],
        send_metrics_to_platform=False,
    )
    weights = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
    world = get_default_framework_module().distributed.world_size
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], weights, world


def floor_weights(n: int, rounds: int) -> dict[str, np.ndarray]:
    """The final weights of ``common.floor1``'s loop: the reference the pfl runs must match."""
    model = common.make_model()
    data = [(c, *common.client_data(c)) for c in range(n)]
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    for r in range(1, rounds + 1):
        acc = common.train_clients(model, data, glob, r)
        glob = {k: v / n for k, v in acc.items()}
    return {k: v.numpy() for k, v in glob.items()}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest absolute difference between two sets of weights with the same names."""
    if a.keys() != b.keys():
        raise ValueError(f"different weights: {sorted(a)} against {sorted(b)}")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def available(python: str) -> bool:
    """Whether ``python`` can import pfl."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pfl') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def run_report(
    python: str, args: list[str], *, procs: int, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Run a pfl script on ``procs`` processes (torchrun when more than one); rank 0's report.

    The report is the last stdout line that is a JSON object; it must name the
    world size the run had. A failed run raises with the end of its output.
    """
    launcher = [python]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    done = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"pfl job failed (exit {done.returncode}):\n{tail}")
    report = json.loads(lines[-1])
    if report["world_size"] != procs:
        raise RuntimeError(f"pfl ran on {report['world_size']} workers, not {procs}")
    return report


def launch(
    n: int, rounds: int, *, procs: int, python: str = sys.executable, timeout: float = 1800
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Run this script with ``procs`` processes (torchrun when more than one).

    Returns the per-round durations rank 0 reports and its final weights.
    """
    script = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.npz"
        args = [script, "--clients", str(n), "--rounds", str(rounds), "--weights", str(weights)]
        report = run_report(python, args, procs=procs, env=env, timeout=timeout)
        with np.load(weights) as saved:
            return report["times"], {k: saved[k] for k in saved.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="N: users, all in each round")
    parser.add_argument("--rounds", type=int, required=True, help="central iterations")
    parser.add_argument("--weights", type=Path, help="rank 0 saves the final weights here (.npz)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)  # pfl's samplers draw their seeds from numpy's global state
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.clients % world:
        # pfl's user sampler cycles per worker: with N not a multiple of the
        # workers, a round trains some users twice and skips others.
        sys.exit(f"--clients {args.clients}: must be a multiple of the {world} processes")
    times, weights, world = run_pfl(args.clients, args.rounds)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.weights is not None:
            np.savez(args.weights, **weights)
        print(json.dumps({"times": times, "world_size": world}), flush=True)
    if torch.distributed.is_initialized():  # torchrun: leave together, or gloo aborts rank 0
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
