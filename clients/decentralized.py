"""The decentralized node: own model and optimizer state, gossip mixing, H local steps, merge."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from clients.sgd import round_config
from fedopt import topology as tp
from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.errors import ConfigError
from fedopt.registry import CLIENTS, OPTIMIZERS
from fedopt.training import LocalTrainConfig, get_weights, load_weights_, train_local

__all__ = [
    "DecentralizedClient",
    "load_optimizer_record",
    "optimizer_record",
    "recalibrate_batchnorm",
]

#: Names of the node's records in its ``ClientState``.
MODEL_RECORD = "node-model"
OPTIMIZER_RECORD = "node-optimizer"


def optimizer_record(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """The optimizer's per-parameter state (momentum buffers, step counters) as an ArrayRecord.

    Keys are ``"<parameter index>/<state name>"``; the hyper-parameters are not
    stored (they come from the scenario, or the round's ``local-lr``, each round).
    """
    record = ArrayRecord()
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                record[f"{index}/{name}"] = Array(value.detach().cpu().numpy().copy())
            elif isinstance(value, (int, float)):
                record[f"{index}/{name}"] = Array(np.asarray(value))
    return record


def load_optimizer_record(optimizer: torch.optim.Optimizer, record: ArrayRecord) -> None:
    """Restore the state written by :func:`optimizer_record` into a freshly built optimizer."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = torch.from_numpy(array.numpy().copy())
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def recalibrate_batchnorm(
    model: nn.Module, x: torch.Tensor, *, batch_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """Re-estimate every BatchNorm layer's running statistics on ``x``; return them and the batches.

    Running statistics are reset and ``momentum = None`` makes PyTorch keep
    their plain average over the batches forwarded (in train mode, without
    gradients), so statistics from several nodes combine exactly by a
    batch-weighted mean. Batches of one example are skipped (BatchNorm cannot
    normalise them). The layers' momentum and the model's mode are restored.
    """
    layers = _batchnorms(model)
    if not layers:
        return {}, 0
    momenta = [m.momentum for _, m in layers]
    was_training = model.training
    batches = 0
    try:
        for _, m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size]
                if len(xb) < 2:
                    continue
                model(xb)
                batches += 1
    finally:
        for (_, m), momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    stats = {}
    for name, m in layers:
        prefix = f"{name}." if name else ""
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(m, buf, None)
            if value is not None:
                stats[prefix + buf] = value.detach().cpu().numpy().copy()
    return stats, batches


class DecentralizedClient(ClientAlgorithm):
    """A gossip node of decentralized SGD with a single global merge (Zhu et al. 2025).

    Decentralized SGD as D-PSGD (Lian et al. 2017) in its adapt-then-combine
    form: the node keeps its own model and its own optimizer (momentum
    buffers, Adam moments and step counters) in ``Context.state`` across
    rounds. A ``train`` message carries the models of the peers the round's
    gossip matrix W makes it hear and their weights; the node first completes
    the gossip step θ_k ← W_kk θ_k + Σ_l W_kl θ_l over all its floating state
    (never its optimizer state), then runs H local steps (``client.steps``, or
    ``client.epochs`` passes) with its persistent optimizer and sends its model
    back only when the server needs it (to relay or evaluate). A ``merge``
    message carries the merged model: the node adopts it and, for models with
    BatchNorm, re-estimates the running statistics on its data.

    Its training loop is ``fedopt.training.train_local``'s, written out because
    that function builds a fresh optimizer every call.
    """

    #: The strategy this client needs (its other half).
    requires = {"strategy": {"name": "decentralized"}}

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Only the decentralized strategy relays peers' models to a node that keeps its own."""
        if scenario.strategy.name != "decentralized":
            raise ConfigError(
                "strategy.name",
                scenario.strategy.name,
                "'decentralized' (client 'decentralized' keeps its own model across rounds and "
                "mixes the peer models that only strategy 'decentralized' relays)",
            )

    def load_global(self, model: nn.Module, content: Any) -> None:
        """Load ``arrays`` when the message carries a model (the initial or the merged one)."""
        if "arrays" in content:
            load_weights_(model, content["arrays"].to_torch_state_dict())

    def fit(self, job: ClientJob) -> ClientUpdate:
        actions = {"train": self._gossip_and_train, "merge": self._merge}
        action = str(job.config.get(tp.ACTION_KEY, "train"))
        if action not in actions:
            raise ValueError(f"unknown gossip action {action!r}: one of {sorted(actions)}")
        return actions[action](job)

    def _gossip(self, job: ClientJob) -> int:
        """Load this node's model and apply the round's gossip step; return the number of peers."""
        own = job.state.get(MODEL_RECORD)
        if own is not None:
            load_weights_(job.model, own.to_torch_state_dict())
        elif "arrays" not in job.content:
            raise ValueError(f"node {job.cid} has no model: its first message must carry one")
        peers = [int(p) for p in job.config.get(tp.PEERS_KEY, [])]
        if not peers:
            return 0
        states = [get_weights(job.model)]
        states += [{k: a.numpy() for k, a in job.content[tp.peer_key(p)].items()} for p in peers]
        weights = [float(job.config[tp.SELF_WEIGHT_KEY])]
        weights += [float(w) for w in job.config[tp.WEIGHTS_KEY]]
        load_weights_(job.model, tp.mix(states, weights))
        return len(peers)

    def _gossip_and_train(self, job: ClientJob) -> ClientUpdate:
        cfg: LocalTrainConfig = round_config(self.params, job.config)
        peers = self._gossip(job)
        model, x, y = job.model, job.x, job.y.long()
        n = len(x)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS.get(cfg.optimizer, key="client.optimizer").obj(trainable, cfg)
        saved = job.state.get(OPTIMIZER_RECORD)
        if saved is not None:
            load_optimizer_record(optimizer, saved)
        res = train_local(
            model, x, y, cfg, generator=job.generator, optimizer=optimizer, batches=job.batches(cfg)
        )
        job.state.set(MODEL_RECORD, ArrayRecord(model.state_dict()))
        job.state.set(OPTIMIZER_RECORD, optimizer_record(optimizer))
        report = bool(job.config.get(tp.REPORT_KEY, 1))
        return ClientUpdate(
            arrays=ArrayRecord(model.state_dict()) if report else ArrayRecord(),
            num_examples=n,
            work=float(res.examples_processed),
            metrics={
                "train_loss": res.loss,
                "train_accuracy": res.accuracy,
                "steps": res.steps,
                "peers": peers,
                tp.MERGE_WEIGHT_KEY: 1.0,
            },
        )

    def _merge(self, job: ClientJob) -> ClientUpdate:
        """Adopt the merged model (already loaded) and/or re-estimate BatchNorm statistics."""
        if int(job.config.get(tp.ADOPT_KEY, 0)):
            job.state.set(MODEL_RECORD, ArrayRecord(job.model.state_dict()))
        stats, batches = {}, 0
        if int(job.config.get(tp.CALIBRATE_KEY, 0)):
            stats, batches = recalibrate_batchnorm(
                job.model, job.x, batch_size=self.params.batch_size
            )
        return ClientUpdate(
            arrays=ArrayRecord({k: Array(v) for k, v in stats.items()}),
            num_examples=len(job.x),
            work=float(len(job.x)) if batches else 0.0,
            metrics={tp.BATCHES_KEY: batches},
        )


CLIENTS.register("decentralized", DecentralizedClient, params=LocalTrainConfig)
