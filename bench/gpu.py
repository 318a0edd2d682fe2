"""GPU bench: fedopt against pfl-research on pfl's CIFAR-10 shape, seconds and memory per round.

The job is the CIFAR-10 benchmark of the pfl-research paper, with synthetic
images of CIFAR-10's shape (``gpu_model.synthetic_images``, nothing is
downloaded): 1000 clients of 50 images of 3x32x32, 10 classes, 50 clients
per round, one local epoch of SGD (batch 10, lr 0.1, no momentum), FedAvg,
pfl's 2-conv-layer CNN (``gpu_model.cifar_cnn``). It runs twice in one
invocation of this script:

- **fedopt**: ``fedopt.run`` in a fresh spawned process, the images written
  to a temporary ``.npz`` (``data.name = "npz"``, ``partition = "iid"``), the
  model as the custom factory ``"gpu_model:cifar_cnn"``, ``run.num_gpus =
  --gpu-fraction`` (0.1: Ray places ten client workers on the one GPU, each
  training its clients on ``cuda``), packed as fedopt packs by default. Each
  worker logs its own CUDA memory (``gpu_model`` memory log); the value of a
  round is each worker's last sample before the driver's row for that round.
- **pfl-research**: pfl 0.6 with its PyTorch backend (a subprocess of this
  script, ``--pfl-job``) on the same device, in one process on a GPU (pfl
  pins rank ``r`` to ``cuda:r``, so one GPU holds one rank) and on the CPU in
  as many ``torchrun`` processes as fedopt has workers (one per core): a
  ``FederatedDataset`` over the same images (client ``c`` holds images
  ``50c .. 50c + 49``, on the device), ``MinimizeReuseUserSampler``, cohort 50,
  ``SimulatedBackend``, ``FederatedAveraging``, central SGD of lr 1. The user
  dataset function hands pfl each user's images in a fresh random order (pfl
  walks a dataset in stored order, fedopt shuffles every epoch). Its memory is
  read after each central iteration, after ``torch.cuda.synchronize``.

Seconds per round: fedopt's from the ``wall_time`` of consecutive metrics rows,
pfl's from a callback at the end of each central iteration; the steady value
is the median of the rounds after the first (engine start-up, CUDA start-up and
pfl's evaluation of round 1 stay out). The script prints (stdout, markdown):
the steady seconds of both and their ratio, then one row per round with both
durations and memory: with a GPU, ``torch.cuda.memory_allocated`` and
``max_memory_allocated`` (MiB; fedopt's the largest over its workers, with the
client tensors its workers keep on the GPU shown apart), without one the
resident set and its peak. Progress goes to stderr.

Without a CUDA GPU (or with ``--device cpu``) the same job runs on the CPU at
a smaller size (:data:`SIZES`: 100 clients of 50 images, 10 per round, 5
rounds), and the output says so. On the CPU, fedopt's memory columns are its
workers' resident sets (with the client tensors they keep shown apart) and
pfl's rank 0's.

Usage: .venv-bench/bin/python bench/gpu.py [--device auto|cuda|cpu] [--clients N]
       [--per-round K] [--rounds R] [--gpu-fraction 0.1] [--pfl-procs P] [--skip-pfl]
       [--pfl-python PY] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import gpu_model
import numpy as np
import pfl_job
import torch

#: Images per client, local batch size, client learning rate, local epochs (pfl's CIFAR-10 job).
PER_CLIENT, BATCH, LR, EPOCHS = 50, 10, 0.1, 1
#: Seed of the synthetic images (both systems train on the same ones).
DATA_SEED = 0
#: Images of the central test set fedopt's npz dataset needs (never evaluated: eval is off).
TEST_IMAGES = 100
#: Growth from round 2 to the last round still called flat: MiB, or a fraction, the larger.
FLAT_MIB, FLAT_FRACTION = 1.0, 0.02
#: Seconds the pfl subprocess may take.
PFL_TIMEOUT = 900


@dataclass(frozen=True, kw_only=True)
class Job:
    """One size of the job on one device.

    Attributes
    ----------
    clients : int
        Clients in the population.
    per_round : int
        Clients sampled per round.
    rounds : int
        Rounds (pfl: central iterations).
    device : {"cuda", "cpu"}
        Where both systems train.
    gpu_fraction : float
        fedopt's ``run.num_gpus``: the share of the GPU one client worker asks Ray for.
    pfl_procs : int
        pfl's processes (more than one: under ``torchrun``, gloo, CPU only).
    """

    clients: int
    per_round: int
    rounds: int
    device: str
    gpu_fraction: float = 0.1
    pfl_procs: int = 1

    def describe(self) -> str:
        """The job in one line."""
        return (
            f"{self.clients} clients × {PER_CLIENT} images of 3x32x32, {self.per_round} a round, "
            f"{self.rounds} rounds, 1 epoch of SGD (batch {BATCH}, lr {LR:g}), FedAvg, "
            "pfl's 2-conv CNN"
        )


#: Default sizes: pfl's CIFAR-10 shape on a GPU, a smaller job on the CPU.
SIZES = {
    "cuda": {"clients": 1000, "per_round": 50, "rounds": 20},
    "cpu": {"clients": 100, "per_round": 10, "rounds": 5},
}


def say(text: str) -> None:
    """A progress line (stderr)."""
    print(text, file=sys.stderr, flush=True)


# -- fedopt ------------------------------------------------------------------------------


def fedopt_raw(job: Job, train: Path, test: Path) -> dict[str, Any]:
    """The job as a fedopt scenario mapping over the images in ``train`` (and ``test``)."""
    run: dict[str, Any] = {
        "rounds": job.rounds,
        "clients_per_round": job.per_round,
        "eval_every": 0,
        "fed_eval_every": 0,
        "checkpoint_every": 0,
        "diverge_factor": 0.0,
        "num_cpus": 1,
        "num_gpus": job.gpu_fraction if job.device == "cuda" else 0.0,
    }
    return {
        "name": "gpu-bench",
        "data": {"name": "npz", "path": str(train), "test_path": str(test)},
        "partition": {"name": "iid", "num_clients": job.clients, "test_fraction": 0.0},
        "model": {"name": "gpu_model:cifar_cnn"},
        "client": {"name": "sgd", "epochs": EPOCHS, "batch_size": BATCH, "lr": LR},
        "strategy": {"name": "fedavg"},
        "run": run,
    }


def fedopt_side(job: Job, folder: str) -> dict[str, Any]:
    """Run the job on fedopt (call it in a fresh process, :func:`common.isolated`).

    Writes the images to ``folder``, makes every client worker log its memory
    to ``folder/memlog`` and returns each round's duration, the time
    (``time.time``) its metrics row was written, its training loss, and where
    the clients trained.
    """
    from fedopt import parse_scenario, run

    tmp = Path(folder)
    x, y = gpu_model.synthetic_images(job.clients * PER_CLIENT + TEST_IMAGES, seed=DATA_SEED)
    cut = job.clients * PER_CLIENT
    np.savez(tmp / "train.npz", x=x[:cut], y=y[:cut])
    np.savez(tmp / "test.npz", x=x[cut:], y=y[cut:])
    del x, y
    (tmp / "memlog").mkdir()
    os.environ[gpu_model.MEMLOG_ENV] = str(tmp / "memlog")
    os.environ[gpu_model.MEMLOG_SKIP_ENV] = str(os.getpid())
    ends: dict[int, float] = {}

    def on_row(row: dict[str, Any]) -> None:
        ends[int(row["round"])] = time.time()

    scenario = parse_scenario(fedopt_raw(job, tmp / "train.npz", tmp / "test.npz"))
    t0 = time.perf_counter()
    result = run(scenario, out=tmp / "runs", on_row=on_row)
    walls = {int(r["round"]): float(r["wall_time"]) for r in result.rows}
    losses = {int(r["round"]): r.get("train_loss") for r in result.rows}
    rounds = range(1, job.rounds + 1)
    return {
        "times": [walls[r] - walls[r - 1] for r in rounds],
        "ends": [ends[r] for r in rounds],
        "losses": [losses[r] for r in rounds],
        "client_device": result.summary.get("client_device", "unknown"),
        "total": time.perf_counter() - t0,
    }


def worker_memory(
    folder: Path, ends: list[float], *, device: str
) -> tuple[list[dict[str, float]], int]:
    """Per round, the largest memory of any fedopt client worker at the end of that round.

    Keys (MiB): ``allocated``, ``max_allocated``, ``cache`` (client tensors kept
    by the worker runtime), ``working`` and ``max_working`` (those two minus the
    cache, per worker, then the largest), ``rss``, ``rss_working`` (minus the
    cache) and ``peak_rss``. Also returns the
    number of workers that trained (on a GPU: that started CUDA).
    """
    logs = gpu_model.read_memory_logs(folder)
    if device == "cuda":
        logs = {p: s for p, s in logs.items() if any(x["cuda_allocated"] > 0 for x in s)}
    rows = []
    for end in ends:
        found = [s for s in (gpu_model.at(samples, end) for samples in logs.values()) if s]

        def most(fn: Any, found: list[dict[str, float]] = found) -> float:
            return max((fn(s) for s in found), default=float("nan"))

        rows.append(
            {
                "allocated": most(lambda s: s["cuda_allocated"]),
                "max_allocated": most(lambda s: s["cuda_max_allocated"]),
                "cache": most(lambda s: s["client_cache"]),
                "working": most(lambda s: s["cuda_allocated"] - s["client_cache"]),
                "max_working": most(lambda s: s["cuda_max_allocated"] - s["client_cache"]),
                "rss": most(lambda s: s["rss"]),
                "rss_working": most(lambda s: s["rss"] - s["client_cache"]),
                "peak_rss": most(lambda s: s["peak_rss"]),
            }
        )
    return rows, len(logs)


# -- pfl-research ------------------------------------------------------------------------


def run_pfl(job: Job) -> dict[str, Any]:
    """The job on pfl in this process; each round's duration and memory, and pfl's device."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops import pytorch_ops
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    device = pytorch_ops.get_default_device()
    cuda = device.type == "cuda"
    x, y = gpu_model.synthetic_images(job.clients * PER_CLIENT + TEST_IMAGES, seed=DATA_SEED)
    xs = torch.from_numpy(x[: job.clients * PER_CLIENT]).to(device)
    ys = torch.from_numpy(y[: job.clients * PER_CLIENT]).to(device)
    del x, y
    made = dict.fromkeys(range(job.clients), 0)

    def make_dataset(cid: int) -> Dataset:
        made[cid] += 1
        g = torch.Generator().manual_seed(common.round_seed(made[cid], cid))
        idx = (torch.randperm(PER_CLIENT, generator=g) + cid * PER_CLIENT).to(device)
        return Dataset((xs[idx], ys[idx]), user_id=cid)

    stamps: list[float] = []
    memory: list[dict[str, float]] = []

    def stamp() -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    class Stamps(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Metrics:
            stamp()
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
        ) -> tuple[bool, Metrics]:
            stamp()
            now = gpu_model.memory_now()
            memory.append(
                {
                    "allocated": now["cuda_allocated"],
                    "max_allocated": now["cuda_max_allocated"],
                    "rss": now["rss"],
                    "peak_rss": now["peak_rss"],
                }
            )
            return False, Metrics()

    torch.manual_seed(0)
    module = gpu_model.cifar_cnn((3, 32, 32), 10)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    users = FederatedDataset(make_dataset, MinimizeReuseUserSampler(list(range(job.clients))))
    backend = SimulatedBackend(training_data=users, val_data=users)
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=job.rounds,
        evaluation_frequency=job.rounds + 1,  # pfl evaluates at iteration 0 only
        train_cohort_size=job.per_round,
        val_cohort_size=None,
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=EPOCHS, local_learning_rate=LR, local_batch_size=BATCH
    )
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        callbacks=[Stamps()],
        send_metrics_to_platform=False,
    )
    return {
        "times": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "memory": memory,
        "device": str(next(module.parameters()).device),
        "world_size": get_default_framework_module().distributed.world_size,
        "total": time.perf_counter() - t0,
    }


def launch_pfl(job: Job, *, python: str, timeout: float = PFL_TIMEOUT) -> dict[str, Any]:
    """Run :func:`run_pfl` in a subprocess of ``python`` (this script with ``--pfl-job``).

    With ``job.pfl_procs`` > 1 the subprocess is ``torchrun`` with that many
    workers; rank 0 reports.
    """
    env = {**os.environ, "PFL_PYTORCH_DEVICE": job.device, "PYTHONWARNINGS": "ignore"}
    if job.pfl_procs > 1:
        env["OMP_NUM_THREADS"] = "1"
    script = [str(Path(__file__).resolve()), "--pfl-job", json.dumps(dataclasses.asdict(job))]
    return pfl_job.run_report(python, script, procs=job.pfl_procs, env=env, timeout=timeout)


def pfl_job_main(spec: str) -> None:
    """The ``--pfl-job`` entry point: run the job on pfl, print its report as one JSON line."""
    job = Job(**json.loads(spec))
    torch.set_num_threads(1)
    np.random.seed(0)  # pfl's samplers draw their seeds from numpy's global state
    report = run_pfl(job)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report), flush=True)
    if torch.distributed.is_initialized():  # torchrun: leave together, or gloo aborts rank 0
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- the tables --------------------------------------------------------------------------


def steady(times: list[float]) -> float:
    """The steady seconds per round: the median of the rounds after the first."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def growth(values: list[float]) -> str:
    """``"a → b MiB: flat"`` (or ``grew``) from round 2 to the last round."""
    if len(values) < 3 or any(v != v for v in values):
        return "n/a"
    first, last = values[1], values[-1]
    flat = last - first <= max(FLAT_MIB, FLAT_FRACTION * abs(first))
    return f"{first:.1f} → {last:.1f} MiB: {'flat' if flat else 'grew'}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def _sec(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def speed_table(job: Job, fedopt: dict | None, pfl: dict | None, workers: int) -> str:
    """Steady seconds per round of both systems and fedopt / pfl."""
    a = steady(fedopt["times"]) if fedopt else None
    b = steady(pfl["times"]) if pfl else None
    ratio = "n/a" if a is None or b is None else f"{a / b:.2f}x"
    if job.device == "cuda":
        label = f"fedopt, run.num_gpus = {job.gpu_fraction:g} ({workers} client workers, one GPU)"
    else:
        label = f"fedopt ({workers} client workers, 1 CPU each)"
    procs = job.pfl_procs
    base = f"pfl-research 0.6, {procs} process{'es (torchrun)' if procs > 1 else ''}"
    head = ["job", "device", "measured", "s/round", "baseline", "s/round", "ratio"]
    size = f"CNN, {job.clients} clients × {PER_CLIENT}, {job.per_round} a round"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| {size} | {job.device} | {label} | {_sec(a)} | {base} | {_sec(b)} | {ratio} |")
    return "\n".join(lines)


def memory_table(
    job: Job, fedopt: dict | None, ours: list[dict[str, float]], pfl: dict | None
) -> tuple[str, list[str]]:
    """One row per round: both durations and memory; and the flatness lines."""
    theirs = pfl["memory"] if pfl else []
    if job.device == "cuda":
        ours_keys = [
            ("allocated", "fedopt allocated"),
            ("cache", "of it, cached client data"),
            ("max_allocated", "fedopt max allocated"),
        ]
        theirs_keys = [("allocated", "pfl allocated"), ("max_allocated", "pfl max allocated")]
        unit = "MiB, torch.cuda; fedopt: the largest over its client workers"
    else:
        ours_keys = [
            ("rss", "fedopt worker RSS"),
            ("cache", "of it, cached client data"),
            ("peak_rss", "fedopt worker peak RSS"),
        ]
        theirs_keys = [("rss", "pfl RSS"), ("peak_rss", "pfl peak RSS")]
        unit = "MiB, resident set; fedopt: the largest over its client workers"
    head = ["round", "fedopt s", "pfl s"] + [t for _, t in ours_keys + theirs_keys]
    lines = [f"Per round ({unit}):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in range(job.rounds):
        cells = [
            str(r + 1),
            _sec(fedopt["times"][r] if fedopt else None),
            _sec(pfl["times"][r] if pfl and r < len(pfl["times"]) else None),
        ]
        cells += [_mib(ours[r][k] if r < len(ours) else None) for k, _ in ours_keys]
        cells += [_mib(theirs[r][k] if r < len(theirs) else None) for k, _ in theirs_keys]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if job.device == "cuda":
        if ours:
            notes.append(
                "fedopt workers, allocated minus cached client data: "
                f"{growth([m['working'] for m in ours])}; max allocated minus cached client "
                f"data: {growth([m['max_working'] for m in ours])}; cached client data: "
                f"{growth([m['cache'] for m in ours])}"
            )
        if theirs:
            notes.append(
                f"pfl: allocated {growth([m['allocated'] for m in theirs])}; "
                f"max allocated {growth([m['max_allocated'] for m in theirs])}"
            )
    else:
        if ours:
            notes.append(
                f"fedopt workers: RSS minus cached client data "
                f"{growth([m['rss_working'] for m in ours])}; "
                f"RSS {growth([m['rss'] for m in ours])}; "
                f"peak RSS {growth([m['peak_rss'] for m in ours])}; cached client data "
                f"{growth([m['cache'] for m in ours])}"
            )
        if theirs:
            notes.append(
                f"pfl: RSS {growth([m['rss'] for m in theirs])}; "
                f"peak RSS {growth([m['peak_rss'] for m in theirs])}"
            )
    return "\n".join(lines), notes


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--clients", type=int, help="population (default 1000 on GPU, 100 on CPU)")
    parser.add_argument("--per-round", type=int, help="clients per round (default 50 / 10)")
    parser.add_argument("--rounds", type=int, help="rounds (default 20 on GPU, 5 on CPU)")
    parser.add_argument(
        "--gpu-fraction", type=float, default=0.1, help="fedopt's run.num_gpus (default 0.1)"
    )
    parser.add_argument(
        "--pfl-procs",
        type=int,
        help="pfl's processes (default: 1 on a GPU; on the CPU as many as fedopt's workers)",
    )
    parser.add_argument("--skip-pfl", action="store_true", help="no pfl-research run")
    parser.add_argument(
        "--pfl-python", default=sys.executable, help="the Python with pfl (default: this one)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--pfl-job", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pfl_job is not None:
        pfl_job_main(args.pfl_job)
        return

    has_cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        sys.exit("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    size = SIZES[device]
    job = Job(
        clients=args.clients or size["clients"],
        per_round=args.per_round or size["per_round"],
        rounds=args.rounds or size["rounds"],
        device=device,
        gpu_fraction=args.gpu_fraction,
        pfl_procs=args.pfl_procs or (1 if device == "cuda" else os.cpu_count() or 1),
    )
    if job.pfl_procs > 1 and (device == "cuda" or job.per_round % job.pfl_procs):
        sys.exit(
            f"--pfl-procs {job.pfl_procs}: more than one pfl process needs the CPU and a "
            "number of clients per round that is a multiple of it (pfl pins rank r to cuda:r)"
        )
    say(f"job: {job.describe()}, on {device}")
    t0 = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        say("fedopt (fresh process)")
        try:
            fedopt = common.isolated(fedopt_side, job, tmp)
        except Exception as err:  # report it, still measure pfl
            say(f"  fedopt failed: {type(err).__name__}: {err}")
            fedopt, failed = None, [*failed, "fedopt"]
        ours, workers = ([], 0)
        if fedopt is not None:
            ours, workers = worker_memory(Path(tmp) / "memlog", fedopt["ends"], device=device)
            say(
                f"  {steady(fedopt['times']):.4f} s/round; rounds: "
                + ", ".join(f"{t:.3f}" for t in fedopt["times"])
                + f"; train loss {fedopt['losses'][0]} → {fedopt['losses'][-1]}; "
                f"clients on {fedopt['client_device']}; {fedopt['total']:.0f} s"
            )
    pfl = None
    if args.skip_pfl:
        say("pfl-research: skipped (--skip-pfl)")
    elif not pfl_job.available(args.pfl_python):
        say(pfl_job.INSTALL_HINT.format(python=args.pfl_python))
    else:
        say(f"pfl-research, {job.pfl_procs} process(es) (subprocess)")
        try:
            pfl = launch_pfl(job, python=args.pfl_python)
            say(
                f"  {steady(pfl['times']):.4f} s/round; rounds: "
                + ", ".join(f"{t:.3f}" for t in pfl["times"])
                + f"; model on {pfl['device']}; {pfl['total']:.0f} s"
            )
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            say(f"  pfl failed: {err}")
            failed.append("pfl")
    say(f"done in {time.perf_counter() - t0:.0f} s")

    per_round, notes = memory_table(job, fedopt, ours, pfl)
    header = (
        f"{job.describe()}; {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    if device == "cuda":
        header += f", {torch.cuda.get_device_name(0)}"
    text = [header, ""]
    if device == "cpu":
        reason = "no CUDA GPU on this machine" if not has_cuda else "--device cpu"
        text += [
            f"Ran on CPU ({reason}): the smaller job above, not the GPU size "
            f"({SIZES['cuda']['clients']} clients, {SIZES['cuda']['per_round']} a round); "
            "memory is the resident set, not CUDA memory.",
            "",
        ]
    wrong = []
    if fedopt is not None and device not in fedopt["client_device"].split("+"):
        wrong.append(f"fedopt's clients trained on {fedopt['client_device']}, not {device}")
    if pfl is not None and not pfl["device"].startswith(device):
        wrong.append(f"pfl's model was on {pfl['device']}, not {device}")
    text += [speed_table(job, fedopt, pfl, workers), "", per_round, ""]
    text += [f"- {n}" for n in notes + wrong]
    out = "\n".join(text)
    print(out, flush=True)
    if args.markdown is not None:
        args.markdown.write_text(out + "\n")
    if failed or wrong:
        sys.exit("; ".join([*(f"{f} run failed" for f in failed), *wrong]))


if __name__ == "__main__":
    main()
