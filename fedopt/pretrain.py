"""Central warm start (``[pretrain]``) on a dataset's public side, cached; ``public_split`` data.

A scenario with a ``[pretrain]`` section starts every party's model from a
checkpoint trained centrally on the dataset's public side, data that no
client and no test set holds: by causal language modelling on a text
dataset's public texts (:mod:`fedopt.text.datasets`), or by classification on
the public part of a ``public_split`` dataset (:func:`load_public_split`: a
registered dataset with a fixed share of some classes held apart, e.g.
digits 0-4 for a base the clients then adapt to all ten). The checkpoint is cached under
``<cache>/pretrain/<key>/`` where the key hashes everything that determines
it (dataset and its public split, tokenizer, model, pretraining settings,
library versions) and nothing that does not (the run's seed, the client
partition, the federated task's kind), so a sweep over seeds or over the
``lm`` and ``classify`` tasks trains it once. Training happens in the process
that builds the task first (``fedopt pretrain``, or the driver of ``fedopt
run``) under a file lock; workers find it in the cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedopt.cache import atomic_write, cache_dir, config_key
from fedopt.data.core import Dataset, TaskData, holdout, load_task_data, seed32
from fedopt.errors import ConfigError
from fedopt.params import check, to_plain
from fedopt.registry import DATASETS, SECTIONS

__all__ = [
    "PretrainParams",
    "PublicSplitParams",
    "WarmStart",
    "load_public_split",
    "load_warm_start",
    "warm_start",
    "warm_start_key",
]

#: Bumped when the checkpoint's content changes meaning.
_FORMAT = 1


@dataclass(frozen=True)
class PretrainParams:
    """Central pretraining on the dataset's public side before federated training.

    Causal language modelling on a text dataset's public texts; supervised
    classification (cross-entropy, the model's own head) on the public part of
    a ``public_split`` dataset.

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Sequences per step.
    optimizer : str
        ``adam`` or ``sgd``.
    lr : float
        Learning rate.
    seed : int
        Seed of the initial weights and batches (not the run's seed, so runs
        with different seeds share one checkpoint).
    """

    steps: int = 1500
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "'adam' or 'sgd'")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Refuse a warm start for data that has no public side to pretrain on."""
        if not hasattr(scenario.data.params, "public_fraction"):
            raise ConfigError(
                "pretrain",
                scenario.data.name,
                "data with a public side: a text dataset (stdlib_docs, text_files; [pretrain] "
                "trains a language model on its public texts) or public_split (a "
                "classifier on its public examples)",
            )


@dataclass(frozen=True)
class PublicSplitParams:
    """A registered dataset with a public part held apart from every client and test set.

    The public part is a fixed random ``public_fraction`` of the examples of
    ``public_classes``, drawn with ``public_seed`` from the source's examples
    (its train and test sides together, loaded with ``public_seed``), so it is
    the same for every run seed. The rest is split into the pool the clients
    share and the central test set as the source would split it (the run's
    seed, ``data.test_fraction``). Only a ``[pretrain]`` warm start reads the
    public part.

    Attributes
    ----------
    source : str
        A registered dataset without its own public side (``digits``,
        ``synthetic``, ``blobs``), loaded with its default parameters.
    public_fraction : float
        Share of the public classes' examples held apart as public, in (0, 1).
    public_classes : tuple of int
        The classes the public part holds; empty: every class.
    public_seed : int
        Seed of the public draw (and of the source's loading).
    """

    source: str = "digits"
    public_fraction: float = 0.5
    public_classes: tuple[int, ...] = ()
    public_seed: int = 0

    def __post_init__(self) -> None:
        check(
            0.0 < self.public_fraction < 1.0,
            "public_fraction",
            self.public_fraction,
            "a fraction strictly between 0 and 1",
        )
        check(
            all(c >= 0 for c in self.public_classes),
            "public_classes",
            list(self.public_classes),
            "class indices >= 0 (empty: every class)",
        )
        check(self.public_seed >= 0, "public_seed", self.public_seed, "an integer >= 0")


def _concat(parts: list[Dataset]) -> Dataset:
    def cat(field: str) -> np.ndarray | None:
        values = [getattr(p, field) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return dataclasses.replace(
        parts[0],
        x=np.concatenate([p.x for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        natural_id=cat("natural_id"),
        groups=cat("groups"),
    )


def load_public_split(params: PublicSplitParams, *, test_fraction: float, seed: int) -> TaskData:
    """A registered dataset with a fixed public part held apart for ``[pretrain]`` (digits, ...).

    See :class:`PublicSplitParams`.

    Raises
    ------
    ConfigError
        Under ``data.source`` for an unknown source or one that has its own
        public side, under ``data.public_classes`` for a class the source does
        not have or a draw that leaves it no public example.
    """
    check(
        params.source != "public_split",
        "data.source",
        params.source,
        "a registered dataset other than public_split",
    )
    entry = DATASETS.get(params.source, key="data.source")
    if hasattr(entry.params, "public_fraction"):
        raise ConfigError(
            "data.source",
            params.source,
            "a dataset without its own public side (text datasets have public_fraction)",
        )
    src = load_task_data(params.source, None, test_fraction=0.5, seed=params.public_seed)
    if src.train.text is not None:
        raise ConfigError("data.source", params.source, "a dataset of feature vectors or images")
    full = _concat([src.train, src.test])
    classes = params.public_classes or tuple(range(full.num_classes))
    bad = [c for c in classes if c >= full.num_classes]
    check(
        not bad,
        "data.public_classes",
        list(classes),
        f"classes of {params.source} (0..{full.num_classes - 1})",
    )
    rng = np.random.default_rng(seed32(params.public_seed))
    public = np.zeros(len(full), dtype=bool)
    for c in classes:
        idx = np.flatnonzero(full.y == c)
        take = int(round(params.public_fraction * len(idx)))
        public[rng.permutation(idx)[:take]] = True
    check(
        public.any() and not public.all(),
        "data.public_fraction",
        params.public_fraction,
        "a fraction that leaves both public and private examples",
    )
    rest = full.subset(np.flatnonzero(~public))
    train, test = holdout(rest, test_fraction=test_fraction, seed=seed, stratify=True)
    return TaskData("public_split", train, test, full.subset(np.flatnonzero(public)))


@dataclass(frozen=True)
class WarmStart:
    """A cached warm-start checkpoint: where it is, and what training it reached."""

    path: Path
    key: str
    meta: dict[str, Any]
    cached: bool


def _is_text(scenario: Any) -> bool:
    return hasattr(scenario.data.params, "task")


def _pretrain_data_params(scenario: Any) -> Any:
    """The data parameters pretraining loads: a text dataset's ``lm`` task, else as given."""
    from fedopt.data import data_params

    params = data_params(scenario)
    return dataclasses.replace(params, task="lm") if _is_text(scenario) else params


def warm_start_key(scenario: Any) -> str:
    """The cache key of the scenario's warm start (equal keys share one checkpoint)."""
    return _key(scenario)[0]


def _key(scenario: Any) -> tuple[str, dict[str, Any]]:
    p = scenario.extras["pretrain"]
    versions = {"torch": torch.__version__}
    if _is_text(scenario):
        import transformers

        versions["transformers"] = transformers.__version__
    config = {
        "format": _FORMAT,
        "data": {"name": scenario.data.name, **to_plain(_pretrain_data_params(scenario))},
        "model": {"name": scenario.model.name, **to_plain(scenario.model.params)},
        "pretrain": to_plain(p),
        "versions": versions,
    }
    return config_key(config), config


def _train(scenario: Any, on_step: Callable[[int, int], None] | None) -> tuple[Any, dict]:
    """Train the scenario's model centrally on its public side; return (state, metrics)."""
    from fedopt.models import build_model
    from fedopt.training import LocalTrainConfig, evaluate, train_local

    p = scenario.extras["pretrain"]
    data = load_task_data(
        scenario.data.name,
        _pretrain_data_params(scenario),
        test_fraction=scenario.data.test_fraction,
        seed=p.seed,
    )
    if data.public is None or len(data.public) == 0:
        raise ConfigError(
            "data.public_fraction",
            getattr(scenario.data.params, "public_fraction", 0.0),
            "a fraction > 0 of public data for [pretrain] to train on",
        )
    pub, test = data.public, data.test
    model = build_model(
        scenario.model.name,
        scenario.model.params,
        input_shape=pub.input_shape,
        num_classes=pub.num_classes,
        seed=p.seed,
        text=pub.text,
    )
    x, y = torch.from_numpy(pub.x), torch.from_numpy(pub.y)
    xt, yt = torch.from_numpy(test.x), torch.from_numpy(test.y)
    before = evaluate(model, xt, yt, batch_size=256)
    cfg = LocalTrainConfig(steps=p.steps, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr)
    started = time.perf_counter()
    res = train_local(
        model,
        x,
        y,
        cfg,
        generator=torch.Generator().manual_seed(p.seed),
        after_step=None if on_step is None else (lambda s: on_step(s, p.steps)),
    )
    after = evaluate(model, xt, yt, batch_size=256)
    metrics = {
        "public_sequences": len(pub),  # examples; sequences of a text dataset
        "train_loss": res.loss,
        "test_perplexity_before": math.exp(before.loss),  # exp(test cross-entropy)
        "test_perplexity_after": math.exp(after.loss),
        "test_accuracy_before": before.accuracy,
        "test_accuracy_after": after.accuracy,
        "test_token_accuracy_after": after.accuracy,
        "seconds": time.perf_counter() - started,
    }
    if not math.isfinite(res.loss):
        raise ConfigError("pretrain.lr", p.lr, "a rate at which pretraining does not diverge")
    return model.state_dict(), metrics


def warm_start(scenario: Any, *, on_step: Callable[[int, int], None] | None = None) -> WarmStart:
    """The scenario's warm-start checkpoint: from the cache, or trained now and cached.

    ``on_step(step, total)`` is called after each training step (progress bars).
    """
    from filelock import FileLock

    key, config = _key(scenario)
    where = cache_dir("pretrain", key)
    path, meta_path = where / "model.pt", where / "meta.json"
    with FileLock(str(where / ".lock")):
        if path.is_file() and meta_path.is_file():
            return WarmStart(path, key, json.loads(meta_path.read_text()), cached=True)
        state, metrics = _train(scenario, on_step)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        meta = {"key": key, "config": config, "metrics": metrics}
        atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return WarmStart(path, key, meta, cached=False)


def load_warm_start(model: nn.Module, scenario: Any) -> list[str]:
    """Copy the warm-start weights into ``model`` in place; return the keys left as they were.

    Every weight whose name and shape the checkpoint shares is loaded. What is
    left must be one module (the head of a task the language model was not
    trained for, e.g. a classifier), else the checkpoint does not fit. A
    classifier pretrained on a ``public_split`` dataset loads whole, head
    included (it has the task's classes, whichever of them were public).
    """
    state = torch.load(warm_start(scenario).path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    take = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    left = [k for k in target if k not in take]
    if len({k.rsplit(".", 1)[0] for k in left}) > 1 or not take:
        raise ConfigError(
            "pretrain",
            scenario.model.name,
            f"a model the language-model checkpoint fits; these weights did not load: {left}",
        )
    with torch.no_grad():
        for k, v in take.items():
            target[k].copy_(v)
    return left


SECTIONS.register("pretrain", PretrainParams)
DATASETS.register("public_split", load_public_split, params=PublicSplitParams)
