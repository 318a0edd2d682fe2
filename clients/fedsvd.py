"""Client half of federated LoRA (FedSVD, FFA-LoRA, FedAvg-LoRA): DP-SGD on the adapters only."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from torch import nn

from clients.dpsgd import DPSGDClient
from fedopt.client import ClientJob, ClientUpdate
from fedopt.errors import ConfigError
from fedopt.lora import (
    TRAINS_ATTR,
    LoraParams,
    adapter_state,
    inject_lora,
    set_trainable,
)
from fedopt.privacy.plan import DPSGDParams, resolve_participations
from fedopt.registry import CLIENTS, STRATEGIES
from fedopt.training import load_weights_

__all__ = ["LoraClient", "LoraDPSGDParams", "trained_factors"]


@dataclass(frozen=True)
class LoraDPSGDParams(DPSGDParams, LoraParams):
    """DP-SGD local training (Abadi et al. 2016) of LoRA adapters (Hu et al. 2022).

    Every key of the ``dpsgd`` client (``batch_size``, ``lr``, ``max_grad_norm``,
    ``target_epsilon`` or ``noise_multiplier``, ``non_private``, ...) plus the
    adapters' ``lora_targets``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``
    and ``lora_seed``.
    """

    def __post_init__(self) -> None:
        DPSGDParams.__post_init__(self)
        LoraParams.__post_init__(self)


def trained_factors(scenario: Any) -> tuple[str, ...]:
    """The adapter factors the scenario's strategy lets its clients train.

    Raises
    ------
    ConfigError
        Under ``strategy.name`` when the strategy does not aggregate LoRA adapters.
    """
    name = scenario.strategy.name
    trains = getattr(STRATEGIES.get(name, key="strategy.name").obj, TRAINS_ATTR, None)
    if trains is None:
        lora = [e.name for e in STRATEGIES if getattr(e.obj, TRAINS_ATTR, None) is not None]
        raise ConfigError(
            "strategy.name",
            name,
            "a strategy that aggregates LoRA adapters with client 'lora_dpsgd': " + ", ".join(lora),
        )
    return tuple(trains)


class LoraClient(DPSGDClient):
    """FedSVD (Lee et al., NeurIPS 2025) client: DP-SGD on LoRA adapters, base model frozen.

    Every party's model gets peft LoRA adapters on the ``lora_targets`` layers
    (:func:`fedopt.lora.inject_lora`), and only adapters travel. Each round the
    client loads the adapters the server sent, trains the factors its strategy
    names (B for FedSVD and FFA-LoRA, A and B for FedAvg-LoRA) with the
    scenario's DP-SGD (Opacus: per-sample clipping, noise, the client's ledger
    composed across rounds; ``non_private`` drops the noise), keeps A and the
    base frozen otherwise (no update, no noise), and returns ΔB (and ΔA) with
    its example count. ``max_participations = "expected"`` is resolved to
    ceil(rounds · m / N) before σ is calibrated
    (:func:`fedopt.privacy.plan.resolve_participations`), as the pre-run
    check resolves it.
    """

    metric_stats = {"epsilon": "latest"}
    #: The paired strategy for contract tests (any LoRA strategy will do).
    requires: Mapping[str, Any] = {"strategy": {"name": "fedsvd"}}

    def __init__(self, params: Any, *, scenario: Any) -> None:
        super().__init__(resolve_participations(params, scenario), scenario=scenario)
        self.trains = trained_factors(scenario)

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """The strategy must aggregate LoRA adapters; ``[user_dp]`` clips whole models, not ΔB."""
        trained_factors(scenario)
        if "user_dp" in scenario.extras:
            raise ConfigError(
                "user_dp",
                "(section)",
                "no [user_dp] section with client 'lora_dpsgd' (its clients send adapter "
                "deltas; use the clients' sample-level DP-SGD)",
            )

    @classmethod
    def prepare_model(cls, model: nn.Module, *, params: LoraDPSGDParams) -> nn.Module:
        """The model every party uses: checked by Opacus, then with LoRA adapters injected."""
        return inject_lora(super().prepare_model(model, params=params), params)

    def load_global(self, model: nn.Module, content: RecordDict) -> None:
        """Copy the arrays the server sent (the adapters) into the resident model."""
        load_weights_(model, content["arrays"], strict=False)

    def fit(self, job: ClientJob) -> ClientUpdate:
        set_trainable(job.model, self.trains)
        start = adapter_state(job.model, self.trains)
        update = super().fit(job)
        now = job.model.state_dict()
        delta = {k: (now[k].detach() - v).cpu() for k, v in start.items()}
        return dataclasses.replace(update, arrays=ArrayRecord(delta))


CLIENTS.register("lora_dpsgd", LoraClient, params=LoraDPSGDParams)
