"""Local SGD / Adam training, the client half of the FedAvg family (FedProx included)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.registry import CLIENTS
from fedopt.training import LocalTrainConfig, train_local

__all__ = ["SGDClient"]


class SGDClient(ClientAlgorithm):
    """FedAvg's local optimizer (McMahan et al. 2017), with FedProx's proximal term.

    Runs the epochs or steps of :class:`~fedopt.training.LocalTrainConfig` with
    SGD (momentum, weight decay) or Adam. When the strategy's round
    configuration carries ``proximal-mu`` (FedProx, Li et al. 2020), the loss
    gains (mu/2)·‖w − w_global‖².
    """

    def fit(self, job: ClientJob) -> ClientUpdate:
        mu = float(job.config.get("proximal-mu", 0.0))
        res = train_local(
            job.model, job.x, job.y, self.params, generator=job.generator, proximal_mu=mu
        )
        return ClientUpdate(
            arrays=ArrayRecord(job.model.state_dict()),
            num_examples=res.num_examples,
            work=float(res.examples_processed),
            metrics={"train_loss": res.loss, "train_accuracy": res.accuracy, "steps": res.steps},
        )


CLIENTS.register("sgd", SGDClient, params=LocalTrainConfig)
