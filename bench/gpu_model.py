"""The CIFAR-10-shaped job of bench/gpu.py: its CNN, its synthetic images, and a memory log.

The model is pfl-research's ``simple_cnn`` of its CIFAR-10 benchmark
(``benchmarks/model/pytorch/cnn.py``): conv 3x3 (32, no padding), ReLU, conv 3x3
(64), ReLU, max-pool 2x2, dropout 0.25, flatten (14 x 14 x 64 = 12,544), dense
128, ReLU, dropout 0.5, dense 10, with Glorot-uniform weights. pfl's version
takes channel-last images and transposes them first; this one takes fedopt's
channel-first ``(C, H, W)`` images, the same arithmetic. fedopt's own ``cnn``
is another model (GroupNorm, 16/32 channels, a 64-wide dense layer), so the
bench names this factory as a custom model, ``"gpu_model:cifar_cnn"``; the
class also has the ``loss`` and ``metrics`` methods that pfl's
``PyTorchModel`` calls, so both systems train the same module.

The memory log: when the environment variable :data:`MEMLOG_ENV` names a
directory, the first model built in a process (other than the process whose
id is in :data:`MEMLOG_SKIP_ENV`) starts a daemon thread that samples the
process's memory every :data:`MEMLOG_INTERVAL` seconds and appends a line to
``<dir>/<pid>.jsonl`` whenever a value changed. Ray's workers inherit the
driver's environment, so every fedopt client worker logs its own
``torch.cuda.memory_allocated`` and ``max_memory_allocated``, the bytes of the
client tensors fedopt's worker runtime keeps, and its resident set.
"""

from __future__ import annotations

import json
import math
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Environment variable naming the directory of the per-process memory logs.
MEMLOG_ENV = "FEDOPT_BENCH_MEMLOG"
#: Environment variable holding a process id that must not log (the driver).
MEMLOG_SKIP_ENV = "FEDOPT_BENCH_MEMLOG_SKIP"
#: Seconds between two samples of the memory log.
MEMLOG_INTERVAL = 0.01
MIB = 2**20

_started = threading.Event()


class CifarCNN(nn.Sequential):
    """pfl-research's 2-conv-layer CIFAR-10 CNN, with the methods pfl's ``PyTorchModel`` calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of a batch (pfl's local training objective)."""
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Summed loss and accuracy of a batch, as pfl's ``Weighted`` metrics."""
        from pfl.metrics import Weighted

        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct = (logits.argmax(dim=1) == y).sum().item()
        return {"loss": Weighted(loss, len(x)), "accuracy": Weighted(correct, len(x))}


def cifar_cnn(input_shape: tuple[int, ...], num_classes: int) -> CifarCNN:
    """The model for images of ``input_shape`` ``(C, H, W)`` (square) and ``num_classes`` classes.

    Also starts this process's memory log when :data:`MEMLOG_ENV` asks for one.
    """
    channels, height, width = (int(d) for d in input_shape)
    if height != width or height < 6:
        raise ValueError(f"square images of at least 6x6 pixels, got {tuple(input_shape)}")
    pooled = (height - 4) // 2
    model = CifarCNN(
        nn.Conv2d(channels, 32, kernel_size=3),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(pooled * pooled * 64, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    start_memory_log()
    return model


def synthetic_images(
    num: int, *, shape: tuple[int, int, int] = (3, 32, 32), classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` float32 images of ``shape`` and their int64 labels, a learnable task.

    Each class has a fixed random template; an image is half its class's
    template plus half Gaussian noise (values of standard deviation ~0.7).
    """
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((classes, *shape), dtype=np.float32)
    y = rng.integers(0, classes, num)
    x = rng.standard_normal((num, *shape), dtype=np.float32)
    x *= 0.5
    x += 0.5 * templates[y]
    return x, y.astype(np.int64)


def host_memory() -> tuple[float, float]:
    """This process's resident set and its peak, in MiB (Linux ``/proc``; else peak only)."""
    try:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return math.nan, peak / (MIB if os.uname().sysname == "Darwin" else 1024)


def cached_client_bytes() -> int:
    """Bytes of the client tensors fedopt's worker runtime keeps (0 when none).

    fedopt's ClientRuntime caches the tensors of every client it has served,
    on its device; this reads that cache
    (``fedopt.clientapp._RESIDENT.runtime._tensors``), and gives 0 where a
    fedopt lays it out otherwise.
    """
    import sys

    clientapp = sys.modules.get("fedopt.clientapp")
    runtime = getattr(getattr(clientapp, "_RESIDENT", None), "runtime", None)
    cache = getattr(runtime, "_tensors", None)
    if not isinstance(cache, dict):
        return 0
    try:
        tensors = [t for entry in list(cache.values()) for t in entry]
    except RuntimeError:  # the cache changed while it was read: count it next time
        return -1
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_now() -> dict[str, float]:
    """This process's memory now, in MiB: CUDA allocated and peak (0 before CUDA starts), host."""
    cuda = torch.cuda.is_initialized()
    rss, hwm = host_memory()
    return {
        "cuda_allocated": torch.cuda.memory_allocated() / MIB if cuda else 0.0,
        "cuda_max_allocated": torch.cuda.max_memory_allocated() / MIB if cuda else 0.0,
        "rss": rss,
        "peak_rss": hwm,
    }


def _log_memory(path: Path, interval: float) -> None:
    last: dict[str, float] = {}
    cache = 0
    with path.open("a") as fh:
        while True:
            now = memory_now()
            cached = cached_client_bytes()
            cache = cache if cached < 0 else cached
            now["client_cache"] = cache / MIB
            if now != last:
                fh.write(json.dumps({"t": time.time(), **now}) + "\n")
                fh.flush()
                last = now
            time.sleep(interval)


def start_memory_log(*, interval: float = MEMLOG_INTERVAL) -> bool:
    """Start this process's memory log if :data:`MEMLOG_ENV` asks for one; whether it started."""
    folder = os.environ.get(MEMLOG_ENV)
    if not folder or _started.is_set() or os.environ.get(MEMLOG_SKIP_ENV) == str(os.getpid()):
        return False
    _started.set()
    path = Path(folder) / f"{os.getpid()}.jsonl"
    threading.Thread(target=_log_memory, args=(path, interval), daemon=True).start()
    return True


def read_memory_logs(folder: Path) -> dict[int, list[dict[str, float]]]:
    """Every process's samples in ``folder``, by process id, in time order."""
    logs = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        lines = path.read_text().splitlines()
        samples = []
        for line in lines:
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when the worker was stopped
                continue
        logs[int(path.stem)] = samples
    return logs


def at(samples: list[dict[str, float]], when: float) -> dict[str, float] | None:
    """The last sample taken at or before ``when`` (None when there is none)."""
    found = None
    for sample in samples:
        if sample["t"] > when:
            break
        found = sample
    return found
