"""Local SGD / Adam training, the client half of the FedAvg family (FedProx included)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord

from fedopt import vectorized
from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.registry import CLIENTS
from fedopt.training import LocalTrainConfig, TrainResult, train_local

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
        return self.update(job.model.state_dict(), res)

    @staticmethod
    def update(state: Mapping[str, Any], res: TrainResult) -> ClientUpdate:
        """The reply of a client that trained to ``state`` with outcome ``res``."""
        return ClientUpdate(
            arrays=ArrayRecord(dict(state)),
            num_examples=res.num_examples,
            work=float(res.examples_processed),
            metrics={"train_loss": res.loss, "train_accuracy": res.accuracy, "steps": res.steps},
        )

    def fit_many(
        self, jobs: Sequence[ClientJob], starts: Sequence[Mapping[str, Any]]
    ) -> list[ClientUpdate] | None:
        """Train a pack's clients at once (:mod:`fedopt.vectorized`); None when it cannot.

        ``starts`` are each client's starting weights (what :meth:`load_global` loaded).
        A learning-rate schedule (``lr_schedule``) trains one client at a time.
        """
        model = jobs[0].model
        cfgs = [round_config(self.params, j.config) for j in jobs]
        if (
            any(j.order is not None for j in jobs)
            or any(c.lr_schedule != "constant" for c in cfgs)
            or any(vectorized.unsupported(model, c) for c in cfgs)
        ):
            return None
        pack = [
            vectorized.PackJob(
                x=j.x,
                y=j.y,
                cfg=cfg,
                generator=j.generator,
                start=dict(start),
                proximal_mu=float(j.config.get("proximal-mu", 0.0)),
            )
            for j, cfg, start in zip(jobs, cfgs, starts, strict=True)
        ]
        keys = list(model.state_dict())
        return [
            self.update({k: w[k].detach() for k in keys}, res)
            for w, res in vectorized.train_pack(model, pack)
        ]


CLIENTS.register("sgd", SGDClient, params=LocalTrainConfig)
