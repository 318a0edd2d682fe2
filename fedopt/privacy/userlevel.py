"""User-level DP at the server: the ``[user_dp]`` settings and what each sampling scheme means.

Flower's DP strategy wrappers clip each client's update to C and add
Gaussian noise; :mod:`strategies.dp` puts them around the run's strategy and
:mod:`fedopt.privacy.userlevel_accounting` accounts every released round as
one dp-accounting event. :data:`SAMPLINGS` states, per scheme, the
neighbouring relation, the sensitivity of a round's release and the
multiplier of its Gaussian in units of that sensitivity, which is what the
ledger composes and what ``summary.json`` records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.privacy.secrecy import check_noise_mode
from fedopt.privacy.userlevel_accounting import ACCOUNTANTS_FOR, calibrate_user_noise

__all__ = ["SAMPLINGS", "SamplingScheme", "UserDPParams"]


@dataclass(frozen=True)
class SamplingScheme:
    """What one ``user_dp.sampling`` value selects, releases and is accounted as.

    Attributes
    ----------
    selection, adjacency, sensitivity, noise_std : str
        The summary's words and formulas (C the round's clipping norm, m the
        clients per round, m' the replies averaged, q = m / N).
    sigma_scale : float
        The round's Gaussian multiplier per unit of z (update part).
    count_sensitivity : float
        Sensitivity of the clipped count released by adaptive clipping.
    """

    selection: str
    adjacency: str
    sensitivity: str
    noise_std: str
    sigma_scale: float
    count_sensitivity: float

    def round_sigma(self, *, update_multiplier: float, count_stddev: float | None) -> float:
        """The round's Gaussian multiplier: the update's, joined with the count's when adaptive.

        Two Gaussian releases of one round compose as one Gaussian with
        ``σ = (σ_update⁻² + σ_count⁻²)^(-1/2)``; Flower's split of z into
        ``(z⁻² − (2σ_b)⁻²)^(-1/2)`` and σ_b makes that z (poisson) or z / 2 (fixed).
        """
        a = self.sigma_scale * update_multiplier
        if count_stddev is None:
            return a
        b = count_stddev / self.count_sensitivity
        return (a**-2 + b**-2) ** -0.5

    def sensitivity_value(self, *, clip: float, clients_per_round: int) -> float:
        """The sensitivity of a round of ``clients_per_round`` replies at clipping norm ``clip``.

        Its noise std z·C/m over it is the update's multiplier ``sigma_scale · z``.
        """
        return clip / (self.sigma_scale * clients_per_round)


SAMPLINGS: Mapping[str, SamplingScheme] = MappingProxyType(
    {
        "poisson": SamplingScheme(
            selection="each available client joins a round independently with probability "
            "q = clients_per_round / num_clients; the round's clipped updates are summed, "
            "noised and divided by the fixed q·N = clients_per_round (a round may have any "
            "number of clients, none included: it then releases the noise alone)",
            adjacency="add/remove one client",
            sensitivity="C / (q·N)",
            noise_std="z·C / (q·N)",
            sigma_scale=1.0,
            count_sensitivity=0.5,
        ),
        "fixed": SamplingScheme(
            selection="clients_per_round = m distinct available clients drawn uniformly "
            "without replacement; the m' replies are averaged",
            adjacency="replace one client",
            sensitivity="2·C / m'",
            noise_std="z·C / m'",
            sigma_scale=0.5,
            count_sensitivity=1.0,
        ),
    }
)


@dataclass(frozen=True)
class UserDPParams:
    """User-level DP (McMahan et al. 2018; Andrew et al. 2021) with Flower's DP wrappers.

    ``clipping`` picks the wrapper: ``server_fixed`` / ``client_fixed``
    (``DifferentialPrivacy{Server,Client}SideFixedClipping``, norm
    ``clipping_norm``) or ``server_adaptive`` / ``client_adaptive`` (the
    adaptive-clipping wrappers, starting at ``clipping_norm`` and steering C
    towards the ``target_clipped_quantile`` of the update norms). Client-side
    modes clip on the client with Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod``. Clients are averaged with equal weights.

    ``sampling`` picks how the server draws a round's clients and what the
    accountant composes (:data:`SAMPLINGS`):

    - ``"poisson"`` (default): each available client joins with probability
      q = clients_per_round / num_clients and the round's sum of clipped
      updates plus N(0, (zC)²) is divided by the fixed q·N. That is exactly the
      Poisson-subsampled Gaussian of DP-FedAvg, with the standard, tight
      analysis (add/remove one client, sensitivity C/(qN), multiplier z), so
      it is the default. Unavailable clients cannot be drawn, so a client's
      inclusion probability is at most q: accounting at q stays an upper
      bound as long as availability does not depend on the clients' data.
    - ``"fixed"``: m = clients_per_round distinct clients without
      replacement, their m' replies averaged with noise z·C/m'. Replacing one
      client moves that mean by up to 2C/m', so each round is
      ``SampledWithoutReplacementDpEvent(N, m, Gaussian(z/2))`` under
      replace-one adjacency, composed by dp-accounting's RDP accountant.

    The noise standard deviation always follows the round's own clipping
    norm and reply count, so the multiplier of every round is z (or z/2)
    whatever adaptive clipping or dropped clients do. z is given, or
    calibrated for ``target_epsilon`` over ``run.rounds`` rounds of the same
    event; ``target_epsilon`` is then also a cap: a round that would pass it
    is not released and the run stops. ``accountant`` is dp-accounting's
    ``rdp`` or ``pld`` (poisson) or ``rdp`` (fixed: the only one that
    composes sampling without replacement). ``noise`` says where the noise
    and the client draws come from (:mod:`fedopt.privacy.secrecy`).
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
    noise: str = "secret"
    sampling: Literal["poisson", "fixed"] = "poisson"

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
        check(self.sampling in SAMPLINGS, "sampling", self.sampling, '"poisson" or "fixed"')
        ok = ACCOUNTANTS_FOR[self.sampling]
        check(
            self.accountant in ok,
            "accountant",
            self.accountant,
            f"{' or '.join(repr(a) for a in ok)} under sampling = {self.sampling!r} "
            "(dp-accounting's accountants that compose its event)",
        )
        check_noise_mode(self.noise)
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

    @property
    def scheme(self) -> SamplingScheme:
        """The sampling scheme's facts."""
        return SAMPLINGS[self.sampling]

    def sample_rate(self, scenario: Any) -> float:
        """Q = clients per round / population."""
        return scenario.clients_per_round / scenario.partition.num_clients

    def multiplier(self, scenario: Any) -> float:
        """z: given, or calibrated for ``target_epsilon`` with the run's own round event."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return calibrate_user_noise(
            sampling=self.sampling,
            accountant=self.accountant,
            target_epsilon=float(self.target_epsilon),
            delta=self.delta,
            population=scenario.partition.num_clients,
            sample_size=scenario.clients_per_round,
            rounds=scenario.run.rounds,
            sigma_scale=self.scheme.sigma_scale,
        )

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Refuse what breaks the analysis: other aggregates, data-driven selection, bad noise."""
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
        curriculum = scenario.extras.get("curriculum")
        if curriculum is not None and getattr(curriculum, "select", False):
            raise ConfigError(
                "curriculum.select",
                True,
                "false under [user_dp] (clients picked by scores of their data break the "
                "uniform sampling the user-level accountant amplifies by)",
            )
        if params.sampling == "poisson" and scenario.run.min_replies > 1:
            raise ConfigError(
                "run.min_replies",
                scenario.run.min_replies,
                "1 under [user_dp] sampling = 'poisson' (a Poisson round may draw fewer "
                "clients, or none)",
            )
        z = params.multiplier(scenario)
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
