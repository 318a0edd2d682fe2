"""Central warm start (``[pretrain]``): language-model pretraining on public data, cached.

A scenario with a ``[pretrain]`` section starts every party's model from a
checkpoint trained centrally, by causal language modelling, on the dataset's
public side (texts that no client and no test set holds; see
:mod:`fedopt.text.datasets`). The checkpoint is cached under
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

import torch
from torch import nn

from fedopt.cache import atomic_write, cache_dir, config_key
from fedopt.errors import ConfigError
from fedopt.params import check, to_plain
from fedopt.registry import SECTIONS

__all__ = ["PretrainParams", "WarmStart", "load_warm_start", "warm_start", "warm_start_key"]

#: Bumped when the checkpoint's content changes meaning.
_FORMAT = 1


@dataclass(frozen=True)
class PretrainParams:
    """Central causal-LM pretraining on the dataset's public texts before federated training.

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
        """Refuse a warm start for data that has no text task to pretrain on."""
        if not hasattr(scenario.data.params, "task"):
            raise ConfigError(
                "pretrain",
                scenario.data.name,
                "a text dataset with a public side (stdlib_docs, text_files): [pretrain] "
                "trains a language model on its public texts",
            )


@dataclass(frozen=True)
class WarmStart:
    """A cached warm-start checkpoint: where it is, and what training it reached."""

    path: Path
    key: str
    meta: dict[str, Any]
    cached: bool


def _lm_data_params(scenario: Any) -> Any:
    from fedopt.data import data_params

    return dataclasses.replace(data_params(scenario), task="lm")


def warm_start_key(scenario: Any) -> str:
    """The cache key of the scenario's warm start (equal keys share one checkpoint)."""
    return _key(scenario)[0]


def _key(scenario: Any) -> tuple[str, dict[str, Any]]:
    import transformers

    p = scenario.extras["pretrain"]
    config = {
        "format": _FORMAT,
        "data": {"name": scenario.data.name, **to_plain(_lm_data_params(scenario))},
        "model": {"name": scenario.model.name, **to_plain(scenario.model.params)},
        "pretrain": to_plain(p),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return config_key(config), config


def _train(scenario: Any, on_step: Callable[[int, int], None] | None) -> tuple[Any, dict]:
    """Train the scenario's model centrally on its public texts; return (state, metrics)."""
    from fedopt.data import load_task_data
    from fedopt.models import build_model
    from fedopt.training import LocalTrainConfig, evaluate, train_local

    p = scenario.extras["pretrain"]
    data = load_task_data(
        scenario.data.name,
        _lm_data_params(scenario),
        test_fraction=scenario.data.test_fraction,
        seed=p.seed,
    )
    if data.public is None or len(data.public) == 0:
        raise ConfigError(
            "data.public_fraction",
            getattr(scenario.data.params, "public_fraction", 0.0),
            "a fraction > 0 of public texts for [pretrain] to train on",
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
        "public_sequences": len(pub),
        "train_loss": res.loss,
        "test_perplexity_before": math.exp(before.loss),
        "test_perplexity_after": math.exp(after.loss),
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
    trained for, e.g. a classifier), else the checkpoint does not fit.
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
