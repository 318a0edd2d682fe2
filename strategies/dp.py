"""Privacy on the server: Flower's user-level DP wrappers, privacy reporting, their registrations.

One registered wrapper (``WRAPPERS["privacy"]``) applies to every run that
asks for privacy: a DP-SGD client (``[client] name = "dpsgd"``, sample-level)
and/or a ``[user_dp]`` section (user-level). It puts Flower's own
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` around the
scenario's strategy when ``[user_dp]`` asks for it, and a
:class:`PrivacyReport` around everything, which accounts the user-level
release of each round, leaves out clients whose sample-level budget is
spent, and writes the accountant, δ, the plan and each client's (σ, q,
steps) history into ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedopt.plots import Figure
from fedopt.privacy.plan import DPSGDParams, planned_participations
from fedopt.privacy.userlevel import UserDPParams, UserLevelLedger
from fedopt.registry import CLIENT_MODS, PLOTS, SECTIONS, WRAPPERS
from fedopt.task import derive_seed
from fedopt.wrapper import WrappedStrategy

__all__ = ["PrivacyReport", "UNIT_WEIGHT", "user_dp_mods", "wrap_privacy"]

#: Reply metric by which the inner FedAvg weights clients under user-level DP: always 1.
UNIT_WEIGHT = "dp-unit-weight"
#: Per-client reply metrics that make no sense averaged into a row (they are in per_client).
_CLIENT_ONLY = (
    "epsilon",
    "dp_sigma",
    "dp_q",
    "dp_delta",
    "dp_steps",
    "dp_steps_total",
    "dp_exhausted",
    UNIT_WEIGHT,
)
_NOISE_PURPOSE = 11


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
        "server_fixed": _fixed(DifferentialPrivacyServerSideFixedClipping),
        "client_fixed": _fixed(DifferentialPrivacyClientSideFixedClipping),
        "server_adaptive": _adaptive(DifferentialPrivacyServerSideAdaptiveClipping),
        "client_adaptive": _adaptive(DifferentialPrivacyClientSideAdaptiveClipping),
    }
)
#: Flower's client mod for each client-side clipping mode.
CLIENT_CLIPPING = MappingProxyType(
    {"client_fixed": fixedclipping_mod, "client_adaptive": adaptiveclipping_mod}
)


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global generator for a block, then restore it.

    Flower's DP wrappers draw their noise from ``np.random``; seeding it per
    round from the run seed makes runs reproducible without leaking state.
    """
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _innermost_fedavg(strategy: Any) -> FedAvg | None:
    while strategy is not None and not isinstance(strategy, FedAvg):
        strategy = getattr(strategy, "strategy", None)
    return strategy


class PrivacyReport(WrappedStrategy):
    """Privacy accounting around a strategy (Abadi et al. 2016; McMahan et al. 2018).

    Parameters
    ----------
    strategy : Strategy
        The strategy, already inside Flower's DP wrapper when ``dp`` is given.
    scenario : Scenario
        The run's scenario.
    dp : Strategy or None
        Flower's DP wrapper (to read its current clipping norm).
    user : UserLevelLedger or None
        User-level accounting, one step per round.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        scenario: Any,
        dp: Any = None,
        user: UserLevelLedger | None = None,
    ) -> None:
        super().__init__(strategy)
        self.scenario = scenario
        self.dp = dp
        self.user = user
        client = scenario.client.params
        self.client_params = client if isinstance(client, DPSGDParams) else None
        self.current = ArrayRecord()
        self.clients: dict[int, dict[str, Any]] = {}
        self.exhausted: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _note(self, server_round: int, reply: Message) -> bool:
        """Record a reply's sample-level step; False when the client's budget is spent."""
        m = reply.content["metrics"]
        cid = int(m["cid"])
        if m.get("dp_exhausted"):
            self.exhausted.setdefault(cid, server_round)
            return False
        if self.client_params is not None and "dp_steps" in m:
            h = self.clients.setdefault(cid, {"rounds": [], "sigma": [], "q": [], "steps": []})
            h["rounds"].append(server_round)
            h["sigma"].append(float(m["dp_sigma"]))
            h["q"].append(float(m["dp_q"]))
            h["steps"].append(int(m["dp_steps"]))
            if "epsilon" in m:
                h["epsilon"] = float(m["epsilon"])
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept = [r for r in replies if self._note(server_round, r)]
        out: dict[str, Any] = {}
        if self.client_params is not None:
            out["dp_exhausted_clients"] = len(replies) - len(kept)
        if not kept:
            return self.current, MetricRecord(out)
        if self.user is not None:
            for r in kept:
                r.content["metrics"][UNIT_WEIGHT] = 1.0
        clip_before = float(getattr(self.dp, "clipping_norm", 0.0))
        seed = derive_seed(self.scenario.run.seed, server_round, 0, _NOISE_PURPOSE)
        try:
            with seeded_numpy(seed):
                arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        finally:
            for r in kept:
                if UNIT_WEIGHT in r.content["metrics"]:
                    del r.content["metrics"][UNIT_WEIGHT]
        out.update({k: v for k, v in (metrics or {}).items() if k not in _CLIENT_ONLY})
        if self.user is not None and arrays is not None:
            clip_after = float(self.dp.clipping_norm)
            out["user_epsilon"] = self.user.record_round(
                server_round=server_round,
                replies=len(kept),
                clip_before=clip_before,
                clip_after=clip_after,
            )
            out["user_noise_multiplier"] = self.user.effective[-1]
            out["user_clipping_norm"] = clip_before
        return arrays, MetricRecord(out)

    def _sample_level(self) -> dict[str, Any]:
        p = self.client_params
        if p.non_private:
            return {"non_private": True, "max_grad_norm": p.max_grad_norm, "epsilon": "infinite"}
        return {
            "mechanism": "Opacus DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise",
            "accountant": p.accountant,
            "delta": p.delta,
            "max_grad_norm": p.max_grad_norm,
            "noise_multiplier": p.noise_multiplier,
            "target_epsilon": p.target_epsilon,
            "plan": {
                "participations": planned_participations(p, self.scenario.run.rounds),
                "local_steps": p.steps
                if p.steps is not None
                else f"{p.epochs} x ceil(n_k / {p.batch_size})",
                "sample_rate": f"1 / ceil(n_k / {p.batch_size})",
                "client_sampling_amplification": "none claimed",
            },
            "clients": {str(c): h for c, h in sorted(self.clients.items())},
            "budget_spent_from_round": {str(c): r for c, r in sorted(self.exhausted.items())},
            "recompute": "each client's (sigma, q, steps) entries are Poisson-subsampled "
            "Gaussian steps; e.g. opacus.accountants.RDPAccountant with history = "
            "[(sigma, q, steps), ...] and get_epsilon(delta) gives its epsilon",
        }

    def summary_extra(self) -> dict[str, Any]:
        """The run's privacy facts for summary.json, plus the wrapped strategy's own."""
        out = super().summary_extra()
        privacy: dict[str, Any] = {}
        if self.client_params is not None:
            privacy["sample_level"] = self._sample_level()
        if self.user is not None:
            user_dp = self.scenario.extras["user_dp"]
            privacy["user_level"] = {
                "clipping": user_dp.clipping,
                "initial_clipping_norm": user_dp.clipping_norm,
                "final_clipping_norm": float(self.dp.clipping_norm),
                **self.user.summary(),
            }
        out["privacy"] = privacy
        return out


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
    noise = user_dp.noise(scenario)
    dp = FLOWER_WRAPPERS[user_dp.clipping](strategy, user_dp, noise=noise, sampled=sampled)
    ledger = UserLevelLedger(
        accountant=user_dp.accountant,
        noise_multiplier=noise,
        sample_rate=user_dp.sample_rate(scenario),
        sampled=sampled,
        delta=user_dp.delta,
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
