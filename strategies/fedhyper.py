"""FedHyper's server half: hypergradient global and server-side local learning rates.

The strategy subclasses Flower's ``FedAvg``: Flower averages the client models,
then the hypergradient rules of :mod:`fedopt.hypergrad` rescale the averaged
update (G, GM, FULL), schedule the clients' rate (SL), or hand the previous
global update to clients that schedule their own per-step rate (CL, FULL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedopt import hypergrad as hg
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.partial import register_linear
from fedopt.plots import Figure
from fedopt.registry import PLOTS, STRATEGIES
from fedopt.task import build_task
from strategies.flower import flower_kwargs

__all__ = ["FedHyper", "FedHyperParams"]

#: Round-config key of the clients' learning rate (honoured by ``clients.sgd.round_config``).
LOCAL_LR_KEY = "local-lr"


@dataclass(frozen=True)
class FedHyperParams:
    """FedHyper (Wang, Wang & Li, ICLR 2024): variant and the bounds of every rate.

    Attributes
    ----------
    variant : str
        ``G`` (global rate), ``GM`` (global rate with momentum), ``SL`` (server-side
        local rate), ``CL`` (client-side per-step local rate), ``FULL`` (GM + CL).
    global_lr_min, global_lr_max : float or None
        Bounds of the global rate 1 + a; omitted: the variant's (G [0.2, 5],
        GM/FULL [0.8, 5], SL unbounded).
    momentum : float or None
        Server momentum of GM and FULL; omitted: 0.9.
    hyper_lr : float
        Scale of the dot product added to a each round (1 in the released code,
        whose raw products make a barely move for small models or small updates).
    local_lr_min, local_lr_max : float
        Bounds of SL's local rate (absolute).
    client_factor_min, client_factor_max : float
        Bounds of CL's per-step factor β (the rate is ``client.lr`` · β).
    client_gamma_max : float
        Largest per-step growth γ of β.
    client_x_scale : float
        Weight of the step's alignment with the previous global update.
    """

    variant: Literal["G", "GM", "SL", "CL", "FULL"] = "GM"
    global_lr_min: float | None = None
    global_lr_max: float | None = None
    momentum: float | None = None
    hyper_lr: float = 1.0
    local_lr_min: float = 0.001
    local_lr_max: float = 0.1
    client_factor_min: float = 0.1
    client_factor_max: float = 10.0
    client_gamma_max: float = 1.1
    client_x_scale: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.global_lr_min, self.global_lr_max
        check(lo is None or 0 <= lo <= 1, "global_lr_min", lo, "a number in [0, 1], or omitted")
        check(hi is None or hi >= 1, "global_lr_max", hi, "a number >= 1, or omitted")
        uses_momentum = hg.VARIANTS[self.variant].momentum > 0
        check(
            self.momentum is None or (uses_momentum and 0 <= self.momentum < 1),
            "momentum",
            self.momentum,
            "0 <= m < 1 with variant GM or FULL, else omitted",
        )
        check(self.hyper_lr > 0, "hyper_lr", self.hyper_lr, "a number > 0")
        check(0 < self.local_lr_min, "local_lr_min", self.local_lr_min, "a number > 0")
        check(
            self.local_lr_max >= self.local_lr_min,
            "local_lr_max",
            self.local_lr_max,
            f"a number >= local_lr_min = {self.local_lr_min}",
        )
        check(
            0 < self.client_factor_min <= 1,
            "client_factor_min",
            self.client_factor_min,
            "a number in (0, 1]",
        )
        check(self.client_factor_max >= 1, "client_factor_max", self.client_factor_max, ">= 1")
        check(self.client_gamma_max > 0, "client_gamma_max", self.client_gamma_max, "> 0")
        check(self.client_x_scale >= 0, "client_x_scale", self.client_x_scale, ">= 0")

    def resolved(self) -> hg.Variant:
        """The variant with this section's overrides of its bounds and momentum applied."""
        base = hg.VARIANTS[self.variant]
        bounds = base.global_bounds
        if self.global_lr_min is not None or self.global_lr_max is not None:
            lo, hi = bounds or (None, None)
            lo = self.global_lr_min if self.global_lr_min is not None else lo
            hi = self.global_lr_max if self.global_lr_max is not None else hi
            bounds = (-np.inf if lo is None else lo, np.inf if hi is None else hi)
        momentum = base.momentum if self.momentum is None else self.momentum
        return dataclasses.replace(base, global_bounds=bounds, momentum=momentum)


@register_linear
class FedHyper(FedAvg):
    """FedHyper (Wang, Wang & Li, ICLR 2024): hypergradient learning-rate scheduling.

    Rules, from the released code (``src/federated_main.py``), with
    Δ_t = θ̄_t − θ_t over the model's parameters (buffers are just averaged):

    - G: a ← clip(a + ⟨Δ_{t−1}, Δ_t⟩) from round 2 on; θ_{t+1} = θ_t + (1 + a)·Δ_t.
    - GM, FULL: a ← clip(a + ⟨m_{t−1}, Δ_t⟩); θ_{t+1} = θ̄_t + a·Δ_t + β·a·m_{t−1};
      m_t = Δ_t + β·m_{t−1}.
    - SL: a as in G, unclipped; the clients' rate clip(η0·(1 + a), local bounds) is
      sent as ``local-lr`` and used in the next round. The released code resets
      the rate to η0 at the start of every round, which makes SL a no-op; here
      the rate computed in round t is the one the clients use in round t + 1.
    - CL, FULL: Δ_{t−1} travels to the clients with the model, with the
      per-step rule's constants in the round config (see ``clients/fedhyper.py``).

    Parameters
    ----------
    variant : hypergrad.Variant
        What to adapt and the bounds.
    lr0 : float or None
        The scenario's client rate η0 (needed by SL).
    param_keys : collection of str or None
        Array keys that are trainable parameters; None treats every floating array as
        one, unless the keys come from :meth:`bind_model` (the server loop hands over
        its model) or, used outside a run, from ``scenario``'s model.
    params : FedHyperParams
        The section, for the SL and CL bounds.
    scenario : Scenario or None
        Where to find the model's parameter names when no model was bound.
    """

    def __init__(
        self,
        *,
        variant: hg.Variant,
        params: FedHyperParams,
        lr0: float | None = None,
        param_keys: Collection[str] | None = None,
        scenario: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.variant = variant
        self.params = params
        self.lr0 = lr0
        self._param_keys = None if param_keys is None else frozenset(param_keys)
        self._scenario = scenario
        self.a = 0.0
        self.theta: np.ndarray | None = None
        self.prev: np.ndarray | None = None
        self.last_delta: ArrayRecord | None = None
        self.lr_local = (
            hg.clip(lr0, params.local_lr_min, params.local_lr_max) if lr0 is not None else None
        )

    def bind_model(self, model: nn.Module) -> None:
        """Take the trainable parameter names from the run's model (called by the server loop)."""
        self._param_keys = frozenset(n for n, p in model.named_parameters() if p.requires_grad)

    @property
    def param_keys(self) -> frozenset[str] | None:
        """Array keys that are trainable parameters (None: every floating array)."""
        if self._param_keys is None and self._scenario is not None:
            self.bind_model(build_task(self._scenario).new_model())
        return self._param_keys

    def _keys(self, arrays: ArrayRecord) -> list[str]:
        if self.param_keys is not None:
            return [k for k in arrays.keys() if k in self.param_keys]
        return [k for k in arrays.keys() if np.dtype(arrays[k].dtype).kind == "f"]

    def _flat(self, arrays: ArrayRecord) -> np.ndarray:
        parts = [arrays[k].numpy().astype(np.float64).ravel() for k in self._keys(arrays)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, plus SL's local rate or CL's previous global update."""
        self.theta = self._flat(arrays)
        if self.variant.server_local:
            config[LOCAL_LR_KEY] = float(self.lr_local)
        if self.variant.client_local:
            p = self.params
            config[hg.CLIENTS_KEY] = len(list(grid.get_node_ids()))
            config[hg.X_SCALE_KEY] = p.client_x_scale
            config[hg.GAMMA_MAX_KEY] = p.client_gamma_max
            config[hg.LOW_KEY] = p.client_factor_min
            config[hg.HIGH_KEY] = p.client_factor_max
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.variant.client_local and self.last_delta is not None:
            for msg in messages:
                msg.content[hg.PREV_UPDATE_KEY] = self.last_delta
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average as FedAvg, then apply the variant's global step and rate updates."""
        avg, metrics = super().aggregate_train(server_round, replies)
        if avg is None or self.theta is None:
            return avg, metrics
        keys = self._keys(avg)
        theta_bar = self._flat(avg)
        delta = theta_bar - self.theta
        v = self.variant
        lr_local = self.lr_local
        if self.prev is not None:
            self.a = hg.accumulate(
                self.a, hg.dot(self.prev, delta), rate=self.params.hyper_lr, bounds=v.global_bounds
            )
        a = self.a if v.global_rate else 0.0
        new, self.prev = hg.global_step(
            theta_bar, delta, self.prev if v.global_rate else None, a=a, beta=v.momentum
        )
        if v.server_local:
            self.lr_local = hg.server_local_rate(
                self.a, lr0=self.lr0, low=self.params.local_lr_min, high=self.params.local_lr_max
            )
        out = ArrayRecord()
        offset = 0
        last = ArrayRecord()
        for key in avg.keys():
            old = avg[key].numpy()
            if key not in keys:
                out[key] = Array(old)
                continue
            size = old.size
            out[key] = Array(new[offset : offset + size].reshape(old.shape).astype(old.dtype))
            last[key] = Array(delta[offset : offset + size].reshape(old.shape).astype(old.dtype))
            offset += size
        self.last_delta = last if v.client_local else None
        metrics = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        metrics["lr_global"] = 1.0 + a
        metrics["update_norm"] = float(np.linalg.norm(delta))
        if v.server_local:
            metrics["lr_local"] = float(lr_local)
        return out, metrics

    def summary_extra(self) -> dict[str, Any]:
        """The final rates, for summary.json."""
        out: dict[str, Any] = {"lr_global_final": 1.0 + (self.a if self.variant.global_rate else 0)}
        if self.variant.server_local:
            out["lr_local_final"] = float(self.lr_local)
        return {"fedhyper": out}


def _fedhyper(params: FedHyperParams, *, scenario: Any) -> FedHyper:
    """FedHyper (Wang, Wang & Li, ICLR 2024): hypergradient global and local learning rates."""
    return FedHyper(
        **flower_kwargs(),
        variant=params.resolved(),
        params=params,
        lr0=getattr(scenario.client.params, "lr", None),
        scenario=scenario,
    )


def _check_scenario(scenario: Any) -> None:
    """CL and FULL need the ``fedhyper`` client; SL needs a client with an ``lr``."""
    variant = scenario.strategy.params.variant
    if variant in hg.CLIENT_VARIANTS and scenario.client.name != "fedhyper":
        raise ConfigError(
            "client.name",
            scenario.client.name,
            f"'fedhyper' (strategy.variant = '{variant}' schedules the clients' per-step "
            "rate, which only the SGD client 'fedhyper' can drive)",
        )
    if hg.VARIANTS[variant].server_local and not hasattr(scenario.client.params, "lr"):
        raise ConfigError(
            "client.name",
            scenario.client.name,
            "a client with an 'lr' key (strategy.variant = 'SL' schedules the local rate)",
        )


_fedhyper.check_scenario = _check_scenario  # type: ignore[attr-defined]

STRATEGIES.register("fedhyper", _fedhyper, params=FedHyperParams)
PLOTS.register(
    "fedhyper_global_lr",
    Figure("lr_global_vs_round.png", "round", "Round", "Global learning rate", ("lr_global",)),
)
PLOTS.register(
    "fedhyper_local_lr",
    Figure(
        "lr_local_vs_round.png",
        "round",
        "Round",
        "Local learning rate",
        ("lr_local", "lr_client_min", "lr_client_mean", "lr_client_max"),
    ),
)
