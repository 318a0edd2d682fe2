"""Privacy on the server: Flower's user-level DP wrappers, privacy reporting, their registrations.

One registered wrapper (``WRAPPERS["privacy"]``) applies to every run that
asks for privacy: a DP-SGD client (``[client] name = "dpsgd"``, sample-level)
and/or a ``[user_dp]`` section (user-level). It puts Flower's own
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` (in the
noise-tracking subclasses below) around the scenario's strategy when
``[user_dp]`` asks for it, and a :class:`PrivacyReport` around everything,
which draws the round's clients (``select_clients``), releases and accounts
the user-level aggregate of each round, caps it at ``target_epsilon``, leaves
out clients whose sample-level budget is spent, and writes every privacy
fact into ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedopt.plots import Figure
from fedopt.privacy.plan import DPSGDParams
from fedopt.privacy.userlevel import UserDPParams
from fedopt.privacy.userlevel_accounting import UserLevelLedger
from fedopt.registry import CLIENT_MODS, PLOTS, SECTIONS, WRAPPERS
from strategies.dp_report import UNIT_WEIGHT, PrivacyReport

__all__ = ["FLOWER_WRAPPERS", "PrivacyReport", "UNIT_WEIGHT", "user_dp_mods", "wrap_privacy"]


class _TrackedNoise:
    """Flower's DP wrapper, its noise std following the round's own clip and reply count.

    Flower draws the noise with ``num_sampled_clients`` fixed at m and, with
    adaptive clipping, with the norm already updated for the next round; here
    the std is z·C/m' with C the norm the round clipped with and m' the
    replies averaged, so the round's multiplier is exactly what was planned.
    The adaptive wrappers move C with the noised fraction of *unclipped*
    updates (Andrew et al. 2021), so that C tracks the target quantile of the
    update norms.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_sampled_clients = max(1, len(replies))
        self.round_clipping_norm = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        after = self.clipping_norm
        self.clipping_norm = getattr(self, "round_clipping_norm", after)
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = after

    def _noisy_fraction(self, count: int, total: int) -> float:
        return 1.0 - super()._noisy_fraction(count, total)


class ServerFixed(_TrackedNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, noise tracking the replies."""


class ClientFixed(_TrackedNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping, noise tracking the replies."""


class ServerAdaptive(_TrackedNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noise tracking the round's clip and replies."""


class ClientAdaptive(_TrackedNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, noise tracking the round's clip and replies."""


def _fixed(cls: type) -> Callable[..., Strategy]:
    def build(strategy: Strategy, p: UserDPParams, *, noise: float, sampled: int) -> Strategy:
        return cls(strategy, noise, p.clipping_norm, sampled)

    return build


def _adaptive(cls: type) -> Callable[..., Strategy]:
    def build(strategy: Strategy, p: UserDPParams, *, noise: float, sampled: int) -> Strategy:
        return cls(
            strategy,
            noise,
            sampled,
            initial_clipping_norm=p.clipping_norm,
            target_clipped_quantile=p.target_clipped_quantile,
            clip_norm_lr=p.clip_norm_lr,
            clipped_count_stddev=p.clipped_count_stddev,
        )

    return build


#: Flower's wrapper for each ``user_dp.clipping`` mode.
FLOWER_WRAPPERS = MappingProxyType(
    {
        "server_fixed": _fixed(ServerFixed),
        "client_fixed": _fixed(ClientFixed),
        "server_adaptive": _adaptive(ServerAdaptive),
        "client_adaptive": _adaptive(ClientAdaptive),
    }
)
#: Flower's client mod for each client-side clipping mode.
CLIENT_CLIPPING = MappingProxyType(
    {"client_fixed": fixedclipping_mod, "client_adaptive": adaptiveclipping_mod}
)


def _innermost_fedavg(strategy: Any) -> FedAvg | None:
    while strategy is not None and not isinstance(strategy, FedAvg):
        strategy = getattr(strategy, "strategy", None)
    return strategy


def wrap_privacy(strategy: Strategy, *, scenario: Any) -> Strategy:
    """Wrap the run's strategy for DP-SGD clients and/or ``[user_dp]``; else return it as is."""
    user_dp = scenario.extras.get("user_dp")
    if user_dp is None and not isinstance(scenario.client.params, DPSGDParams):
        return strategy
    if user_dp is None:
        return PrivacyReport(strategy, scenario=scenario)
    inner = _innermost_fedavg(strategy)
    if inner is not None:
        inner.weighted_by_key = UNIT_WEIGHT
    sampled = scenario.clients_per_round
    noise = user_dp.multiplier(scenario)
    dp = FLOWER_WRAPPERS[user_dp.clipping](strategy, user_dp, noise=noise, sampled=sampled)
    ledger = UserLevelLedger(
        accountant=user_dp.accountant,
        sampling=user_dp.sampling,
        delta=user_dp.delta,
        target_epsilon=user_dp.target_epsilon,
    )
    return PrivacyReport(dp, scenario=scenario, dp=dp, user=ledger)


def _train_only(mod: Callable[..., Message]) -> Callable[..., Message]:
    def apply(msg: Message, context: Any, call_next: Any) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            return mod(msg, context, call_next)
        return call_next(msg, context)

    return apply


def user_dp_mods(scenario: Any) -> list[Callable[..., Message]]:
    """Flower's client-side clipping mod (train messages only) when ``[user_dp]`` clips there."""
    user_dp = scenario.extras.get("user_dp")
    mod = CLIENT_CLIPPING.get(user_dp.clipping) if user_dp is not None else None
    return [_train_only(mod)] if mod is not None else []


SECTIONS.register("user_dp", UserDPParams)
WRAPPERS.register("privacy", wrap_privacy)
CLIENT_MODS.register("user_dp_clipping", user_dp_mods)
PLOTS.register(
    "accuracy_vs_epsilon",
    Figure(
        filename="accuracy_vs_epsilon.png",
        x="epsilon_max",
        xlabel="ε (sample-level, max over clients)",
        ylabel="Accuracy",
        keys=("accuracy",),
    ),
)
PLOTS.register(
    "accuracy_vs_user_epsilon",
    Figure(
        filename="accuracy_vs_user_epsilon.png",
        x="user_epsilon",
        xlabel="ε (user-level)",
        ylabel="Accuracy",
        keys=("accuracy",),
    ),
)
