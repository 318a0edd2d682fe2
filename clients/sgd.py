"""Local SGD / Adam training, the client half of the FedAvg family (FedProx included)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord

from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.registry import CLIENTS
from fedopt.training import LocalTrainConfig, train_local

__all__ = ["SGDClient", "round_config"]

#: Round-config key with which a strategy sets the clients' learning rate for a round.
LOCAL_LR_KEY = "local-lr"


def round_config(params: LocalTrainConfig, config: Mapping[str, Any]) -> LocalTrainConfig:
    """The local training settings for this round: the scenario's, with ``local-lr`` applied."""
    if LOCAL_LR_KEY in config:
        return dataclasses.replace(params, lr=float(config[LOCAL_LR_KEY]))
    return params


class SGDClient(ClientAlgorithm):
    """FedAvg's local optimizer (McMahan et al. 2017), with FedProx's proximal term.

    Runs the epochs or steps of :class:`~fedopt.training.LocalTrainConfig` with
    SGD (momentum, weight decay) or Adam. When the strategy's round
    configuration carries ``proximal-mu`` (FedProx, Li et al. 2020), the loss
    gains (mu/2)·‖w − w_global‖². A ``local-lr`` entry in the round
    configuration (a strategy that schedules client learning rates) replaces
    the scenario's ``lr`` for that round.
    """

    def fit(self, job: ClientJob) -> ClientUpdate:
        mu = float(job.config.get("proximal-mu", 0.0))
        cfg = round_config(self.params, job.config)
        res = train_local(
            job.model,
            job.x,
            job.y,
            cfg,
            generator=job.generator,
            proximal_mu=mu,
            batches=job.batches(cfg),
        )
        return ClientUpdate(
            arrays=ArrayRecord(job.model.state_dict()),
            num_examples=res.num_examples,
            work=float(res.examples_processed),
            metrics={"train_loss": res.loss, "train_accuracy": res.accuracy, "steps": res.steps},
        )


CLIENTS.register("sgd", SGDClient, params=LocalTrainConfig)
