"""Flower's own server strategies (the FedAvg family), registered under fedopt names.

Each factory builds the Flower class itself; fedopt's round loop decides which
clients take part (seeded sampling, availability) and hands the strategy a grid
that exposes exactly those nodes, so every strategy samples "all" of them.
Aggregation is Flower's own code, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedopt.params import check
from fedopt.registry import STRATEGIES, NoParams

__all__ = ["flower_kwargs"]


def flower_kwargs() -> dict[str, Any]:
    """Keyword arguments that make a Flower strategy train and evaluate every node it is shown."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


@dataclass(frozen=True)
class FedAvgMParams:
    """FedAvgM (Hsu et al. 2019): server learning rate and momentum."""

    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        check(
            self.server_learning_rate > 0, "server_learning_rate", self.server_learning_rate, "> 0"
        )
        check(0 <= self.server_momentum < 1, "server_momentum", self.server_momentum, "0 <= m < 1")


@dataclass(frozen=True)
class FedProxParams:
    """FedProx (Li et al. 2020): weight mu of the clients' proximal term."""

    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        check(self.proximal_mu >= 0, "proximal_mu", self.proximal_mu, "a number >= 0")


@dataclass(frozen=True)
class FedOptParams:
    """Adaptive server optimizers (Reddi et al. 2021): server rate, moments, adaptivity tau."""

    eta: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check(self.eta > 0, "eta", self.eta, "a server learning rate > 0")
        check(0 <= self.beta_1 < 1, "beta_1", self.beta_1, "0 <= beta_1 < 1")
        check(0 <= self.beta_2 < 1, "beta_2", self.beta_2, "0 <= beta_2 < 1")
        check(self.tau > 0, "tau", self.tau, "a number > 0")


@dataclass(frozen=True)
class TrimmedParams:
    """Trimmed mean: the fraction cut from each end."""

    beta: float = 0.2

    def __post_init__(self) -> None:
        check(0 <= self.beta < 0.5, "beta", self.beta, "0 <= beta < 0.5")


@dataclass(frozen=True)
class KrumParams:
    """Krum (Blanchard et al. 2017): the number of Byzantine clients tolerated."""

    num_malicious_nodes: int = 0

    def __post_init__(self) -> None:
        check(
            self.num_malicious_nodes >= 0, "num_malicious_nodes", self.num_malicious_nodes, ">= 0"
        )


def _fedavg(params: NoParams, *, scenario: Any) -> Strategy:
    """FedAvg (McMahan et al. 2017): example-weighted mean of client models."""
    return FedAvg(**flower_kwargs())


def _fedavgm(params: FedAvgMParams, *, scenario: Any) -> Strategy:
    """FedAvgM (Hsu et al. 2019): FedAvg with server momentum."""
    return FedAvgM(
        **flower_kwargs(),
        server_learning_rate=params.server_learning_rate,
        server_momentum=params.server_momentum,
    )


def _fedprox(params: FedProxParams, *, scenario: Any) -> Strategy:
    """FedProx (Li et al. 2020): FedAvg whose clients add (mu/2)||w - w_global||^2."""
    return FedProx(**flower_kwargs(), proximal_mu=params.proximal_mu)


def _fedopt_factory(cls: type) -> Any:
    def factory(params: FedOptParams, *, scenario: Any) -> Strategy:
        return cls(
            **flower_kwargs(),
            eta=params.eta,
            beta_1=params.beta_1,
            beta_2=params.beta_2,
            tau=params.tau,
        )

    factory.__doc__ = f"{cls.__name__} (Reddi et al. 2021): adaptive server optimizer."
    return factory


@dataclass(frozen=True)
class AdagradParams:
    """FedAdagrad: server learning rate and adaptivity tau."""

    eta: float = 0.1
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check(self.eta > 0, "eta", self.eta, "a server learning rate > 0")
        check(self.tau > 0, "tau", self.tau, "a number > 0")


def _fedadagrad(params: AdagradParams, *, scenario: Any) -> Strategy:
    """FedAdagrad (Reddi et al. 2021): Adagrad on the server pseudo-gradient."""
    return FedAdagrad(**flower_kwargs(), eta=params.eta, tau=params.tau)


def _fedmedian(params: NoParams, *, scenario: Any) -> Strategy:
    """FedMedian (Yin et al. 2018): coordinate-wise median of client models."""
    return FedMedian(**flower_kwargs())


def _fedtrimmedavg(params: TrimmedParams, *, scenario: Any) -> Strategy:
    """FedTrimmedAvg (Yin et al. 2018): coordinate-wise trimmed mean."""
    return FedTrimmedAvg(**flower_kwargs(), beta=params.beta)


def _krum(params: KrumParams, *, scenario: Any) -> Strategy:
    """Krum (Blanchard et al. 2017): the client model closest to its neighbours."""
    return Krum(**flower_kwargs(), num_malicious_nodes=params.num_malicious_nodes)


STRATEGIES.register("fedavg", _fedavg)
STRATEGIES.register("fedavgm", _fedavgm, params=FedAvgMParams)
STRATEGIES.register("fedprox", _fedprox, params=FedProxParams)
STRATEGIES.register("fedadam", _fedopt_factory(FedAdam), params=FedOptParams)
STRATEGIES.register("fedyogi", _fedopt_factory(FedYogi), params=FedOptParams)
STRATEGIES.register("fedadagrad", _fedadagrad, params=AdagradParams)
STRATEGIES.register("fedmedian", _fedmedian)
STRATEGIES.register("fedtrimmedavg", _fedtrimmedavg, params=TrimmedParams)
STRATEGIES.register("krum", _krum, params=KrumParams)
