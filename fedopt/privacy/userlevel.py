"""User-level DP at the server: the ``[user_dp]`` settings and the per-round accounting.

Flower's DP strategy wrappers clip each client's update to C and add
Gaussian noise of standard deviation z·C/m to the mean of the m sampled
clients, but account for nothing. :class:`UserLevelLedger` composes one
subsampled Gaussian per round through the accountant registry: noise
multiplier z, sampling rate q = m / N (clients per round over the
population). Where a round deviates from what the noise was calibrated for,
the round is accounted with the smaller effective multiplier, never the
nominal one: fewer than m replies (noise z·C/m over a mean of m' < m updates
is z·m'/m in units of that mean's sensitivity C/m'), or an adaptive clipping
norm that shrank before the noise was drawn (z·C_new/C_old).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.privacy.accountants import check_accountant_name, make_accountant
from fedopt.privacy.calibration import calibrate_noise

__all__ = ["SAMPLING_ASSUMPTION", "UserDPParams", "UserLevelLedger"]

#: What the user-level accountant assumes about client sampling, stated in every summary.
SAMPLING_ASSUMPTION = (
    "Poisson sampling of each client with q = clients_per_round / num_clients, one "
    "subsampled Gaussian per round; fedopt samples a fixed-size subset without replacement "
    "(times availability), for which the Poisson analysis is the usual approximation"
)


@dataclass(frozen=True)
class UserDPParams:
    """User-level DP (McMahan et al. 2018; Andrew et al. 2021) with Flower's DP wrappers.

    ``clipping`` picks the wrapper: ``server_fixed`` / ``client_fixed``
    (``DifferentialPrivacy{Server,Client}SideFixedClipping``, norm
    ``clipping_norm``) or ``server_adaptive`` / ``client_adaptive`` (the
    adaptive-clipping wrappers, starting at ``clipping_norm`` and steering
    towards ``target_clipped_quantile``). Client-side modes clip on the client
    with Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``. The noise
    multiplier z is given, or calibrated for ``target_epsilon`` over
    ``run.rounds`` rounds. Clients are averaged with equal weights, which the
    noise's sensitivity C/m assumes.
    """

    clipping: Literal["server_fixed", "server_adaptive", "client_fixed", "client_adaptive"] = (
        "server_fixed"
    )
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clipping_norm: float = 1.0
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        z, target = self.noise_multiplier, self.target_epsilon
        check(
            z is None or 0.0 < z < math.inf,
            "noise_multiplier",
            z,
            "a finite number > 0 (z = 0 is not private: leave out [user_dp] instead)",
        )
        check(target is None or 0.0 < target < math.inf, "target_epsilon", target, "a number > 0")
        check(0.0 < self.delta < 1.0, "delta", self.delta, "a probability 0 < δ < 1")
        check(self.clipping_norm > 0, "clipping_norm", self.clipping_norm, "a number > 0")
        q = self.target_clipped_quantile
        check(0.0 <= q <= 1.0, "target_clipped_quantile", q, "a quantile in [0, 1]")
        check(self.clip_norm_lr > 0, "clip_norm_lr", self.clip_norm_lr, "a number > 0")
        sd = self.clipped_count_stddev
        check(sd is None or sd > 0, "clipped_count_stddev", sd, "a number > 0 or omitted")
        check_accountant_name(self.accountant)
        check(
            (z is None) != (target is None),
            "target_epsilon" if z is None else "noise_multiplier",
            target if z is None else z,
            "exactly one of noise_multiplier and target_epsilon",
        )

    @property
    def adaptive(self) -> bool:
        """Whether the clipping norm adapts (Andrew et al. 2021)."""
        return self.clipping.endswith("adaptive")

    def sample_rate(self, scenario: Any) -> float:
        """Q = clients per round / population."""
        return scenario.clients_per_round / scenario.partition.num_clients

    def noise(self, scenario: Any) -> float:
        """z: given, or calibrated for ``target_epsilon`` over every round of the run."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return calibrate_noise(
            target_epsilon=float(self.target_epsilon),
            delta=self.delta,
            sample_rate=self.sample_rate(scenario),
            steps=scenario.run.rounds,
            accountant=self.accountant,
            key="user_dp.target_epsilon",
        )

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Refuse strategies whose aggregate is not FedAvg's mean, and infeasible noise."""
        from flwr.serverapp.strategy import FedAvg

        from fedopt.registry import STRATEGIES

        params = scenario.extras["user_dp"]
        entry = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
        strategy = entry.obj(scenario.strategy.params, scenario=scenario)
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not (
            FedAvg.aggregate_train
        ):
            ok = [e.name for e in STRATEGIES if _is_fedavg_mean(e, scenario, FedAvg)]
            raise ConfigError(
                "strategy.name",
                scenario.strategy.name,
                "a strategy that aggregates with FedAvg's mean under [user_dp] (the noise "
                f"z·C/m is calibrated for that mean): {', '.join(ok)}",
            )
        z = params.noise(scenario)
        if params.adaptive:
            sd = params.clipped_count_stddev or scenario.clients_per_round / 20
            check(
                z < 2 * sd,
                "user_dp.clipped_count_stddev",
                params.clipped_count_stddev,
                f"a value > z / 2 = {z / 2:g} (Flower splits z between the update and the "
                "clipped count)",
            )


def _is_fedavg_mean(entry: Any, scenario: Any, fedavg: type) -> bool:
    """Whether the registered strategy, with default parameters, aggregates with FedAvg's mean."""
    try:
        strategy = entry.obj(entry.params(), scenario=scenario)
    except Exception:  # noqa: BLE001  (a factory that needs more than defaults: not listed)
        return False
    return isinstance(strategy, fedavg) and type(strategy).aggregate_train is fedavg.aggregate_train


class UserLevelLedger:
    """Per-round user-level accounting of a DP-wrapped strategy.

    Parameters
    ----------
    accountant : str
        A registered accountant name.
    noise_multiplier : float
        The nominal z of the wrapper.
    sample_rate : float
        q = m / N.
    sampled : int
        m, the clients per round the noise was calibrated for.
    delta : float
        δ of the reported ε.
    """

    def __init__(
        self,
        *,
        accountant: str,
        noise_multiplier: float,
        sample_rate: float,
        sampled: int,
        delta: float,
    ) -> None:
        self.accountant = make_accountant(accountant)
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.sampled = sampled
        self.delta = delta
        self.rounds: list[int] = []
        self.effective: list[float] = []

    def record_round(
        self, *, server_round: int, replies: int, clip_before: float, clip_after: float
    ) -> float:
        """Compose one round in which ``replies`` updates were averaged; return ε so far."""
        if replies <= 0:
            return self.epsilon
        shrink = min(1.0, clip_after / clip_before) if clip_before > 0 else 1.0
        z = self.noise_multiplier * min(1.0, replies / self.sampled) * shrink
        self.accountant.step(noise_multiplier=z, sample_rate=self.sample_rate)
        self.rounds.append(int(server_round))
        self.effective.append(z)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        """ε of every round composed so far."""
        return self.accountant.get_epsilon(self.delta)

    def summary(self) -> dict[str, Any]:
        """The accounting facts for summary.json."""
        return {
            "accountant": self.accountant.name,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clients_per_round": self.sampled,
            "sampling_assumption": SAMPLING_ASSUMPTION,
            "history": self.accountant.state_dict()["history"],
            "epsilon": self.epsilon,
        }
