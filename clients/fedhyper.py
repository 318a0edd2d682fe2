"""FedHyper's client half: local SGD whose step size follows a per-step hypergradient rule."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.sgd import round_config
from fedopt import hypergrad as hg
from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.errors import ConfigError
from fedopt.registry import CLIENTS
from fedopt.training import LocalTrainConfig, train_local

__all__ = ["FedHyperClient"]


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class FedHyperClient(ClientAlgorithm):
    """FedHyper-CL (Wang, Wang & Li, ICLR 2024): SGD with a per-step hypergradient rate.

    The plain or momentum SGD client (``client.optimizer = "sgd"``) whose rate
    in local step k is η0·β_k, η0 being ``client.lr`` (or the round's
    ``local-lr``). After step k ≥ 2, with g_k the change of the parameters in
    that step and Δ_{t−1} the previous global update sent by the server,
    β_k = clip(min(γ_max, 1 + x + y)·β_{k−1}, β_min, β_max),
    x = x_scale·⟨g_k, Δ_{t−1}⟩ / (clients per round), y = ⟨g_k, g_{k−1}⟩,
    g_1 := Δ_{t−1} (``fedopt.hypergrad.client_rate_factor``); β starts at 1
    every round (as ``src/update.py`` of the released code, whose flag also
    skips the first step of every later epoch; here only the round's first
    step is skipped). Δ_{t−1} comes with strategy ``fedhyper`` and variant CL or
    FULL; without it (their first round, or any other strategy) it counts as
    zero, so x = 0 and only the step-to-step alignment y moves the rate.

    Reports ``lr_client`` (the rate of the round's last step) and
    ``lr_client_avg`` (the mean rate over its steps).
    """

    metric_stats = {"lr_client": "round"}

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """The rule schedules SGD's step size: ``client.optimizer`` must be ``sgd``."""
        if scenario.client.params.optimizer != "sgd":
            raise ConfigError(
                "client.optimizer",
                scenario.client.params.optimizer,
                "'sgd' (client 'fedhyper' schedules the SGD step size)",
            )

    def fit(self, job: ClientJob) -> ClientUpdate:
        cfg: LocalTrainConfig = round_config(self.params, job.config)
        c = job.config
        model = job.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        prev_record = job.content.get(hg.PREV_UPDATE_KEY)
        if prev_record is not None:
            sd = prev_record.to_torch_state_dict()
            delta = torch.cat([sd[k].reshape(-1) for k in names]).to(job.device)
        else:
            delta = torch.zeros(sum(p.numel() for p in trainable), device=job.device)
        delta = delta.to(trainable[0].dtype)
        clients = float(c.get(hg.CLIENTS_KEY, self.scenario.clients_per_round))
        optimizer = torch.optim.SGD(
            trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        rates: list[float] = []
        track = {"factor": 1.0, "prev_step": delta, "before": delta}

        def before_step(k: int) -> None:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * track["factor"]
            rates.append(cfg.lr * track["factor"])
            track["before"] = _flat(trainable)

        def after_step(k: int) -> None:
            if k < 2:
                return
            step = _flat(trainable) - track["before"]
            track["factor"] = hg.client_rate_factor(
                track["factor"],
                dot_global=hg.dot(step, delta),
                dot_prev=hg.dot(step, track["prev_step"]),
                clients=clients,
                x_scale=float(c.get(hg.X_SCALE_KEY, 0.1)),
                gamma_max=float(c.get(hg.GAMMA_MAX_KEY, 1.1)),
                low=float(c.get(hg.LOW_KEY, 0.1)),
                high=float(c.get(hg.HIGH_KEY, 10.0)),
            )
            track["prev_step"] = step

        res = train_local(
            model,
            job.x,
            job.y,
            cfg,
            generator=job.generator,
            optimizer=optimizer,
            before_step=before_step,
            after_step=after_step,
            batches=job.batches(cfg),
        )
        return ClientUpdate(
            arrays=ArrayRecord(model.state_dict()),
            num_examples=res.num_examples,
            work=float(res.examples_processed),
            metrics={
                "train_loss": res.loss,
                "train_accuracy": res.accuracy,
                "lr_client": rates[-1] if rates else cfg.lr,
                "lr_client_avg": sum(rates) / len(rates) if rates else cfg.lr,
                "steps": len(rates),
            },
        )


CLIENTS.register("fedhyper", FedHyperClient, params=LocalTrainConfig)
