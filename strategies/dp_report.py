"""The privacy report around a DP run's strategy: client draws, user-level release and ledger.

:class:`PrivacyReport` is the outermost strategy of every private run
(:func:`strategies.dp.wrap_privacy` builds it). Under ``[user_dp]`` it picks
each round's clients (the round loop's ``select_clients`` hook), releases the
round's aggregate (Flower's DP wrapper for ``sampling = "fixed"``; the
fixed-denominator noised sum of :mod:`fedopt.privacy.userlevel_release` for
``"poisson"``, rounds without clients included through
``release_empty_round``), refuses a round that would pass
``target_epsilon`` before anything of it is released, and composes every
released round in a :class:`~fedopt.privacy.userlevel_accounting.UserLevelLedger`.
Its random draws come from the run's secret key or from ``run.seed``
(``user_dp.noise``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedopt.errors import RunError
from fedopt.privacy.plan import DPSGDParams
from fedopt.privacy.secrecy import NoiseKey
from fedopt.privacy.userlevel_accounting import UserLevelLedger, round_event
from fedopt.privacy.userlevel_release import (
    adapted_clip,
    fixed_select,
    noised_sum_release,
    poisson_select,
)
from fedopt.server import find_hook
from fedopt.task import derive_seed
from fedopt.wrapper import WrappedStrategy
from strategies.dp_summary import sample_level_summary, user_level_summary

__all__ = ["PURPOSES", "PrivacyReport", "UNIT_WEIGHT", "seeded_numpy"]

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
    KEY_NORM_BIT,
)
#: The seed purpose of each server-side draw: ``key.seed(purpose, round)``.
PURPOSES = MappingProxyType({"noise": 11, "poisson_select": 13, "fixed_select": 14})


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global generator for a block from all bits of ``seed``, then restore it.

    Flower's DP wrappers draw their noise from ``np.random``; the global
    MT19937 state is expanded from ``SeedSequence(seed)``, so a 63-bit seed
    is not cut to 32 brute-forceable bits.
    """
    state = np.random.get_state()
    np.random.set_state(
        np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed))).get_state()
    )
    try:
        yield
    finally:
        np.random.set_state(state)


@contextmanager
def _unit_weights(replies: list[Message]) -> Iterator[None]:
    """Every reply weighs 1 in the inner FedAvg for the block (equal weights)."""
    for r in replies:
        r.content["metrics"][UNIT_WEIGHT] = 1.0
    try:
        yield
    finally:
        for r in replies:
            if UNIT_WEIGHT in r.content["metrics"]:
                del r.content["metrics"][UNIT_WEIGHT]


def _arrays_of(reply: Message) -> ArrayRecord:
    records = list(reply.content.array_records.values())
    if len(records) != 1:
        raise RunError(f"a user-level DP reply carries {len(records)} ArrayRecords, not one")
    return records[0]


def _client_bits(reply: Message) -> bool:
    metrics = reply.content["metrics"]
    if KEY_NORM_BIT not in metrics:
        raise RunError(f"client-side adaptive clipping: a reply has no '{KEY_NORM_BIT}' metric")
    return bool(metrics[KEY_NORM_BIT])


class PrivacyReport(WrappedStrategy):
    """Privacy accounting around a strategy (Abadi et al. 2016; McMahan et al. 2018).

    Parameters
    ----------
    strategy : Strategy
        The strategy, already inside Flower's DP wrapper when ``dp`` is given.
    scenario : Scenario
        The run's scenario.
    dp : Strategy or None
        Flower's DP wrapper (its clipping norm, noise multiplier, count noise).
    user : UserLevelLedger or None
        User-level accounting, one event per released round.
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
        self.user_dp = scenario.extras.get("user_dp") if user is not None else None
        client = scenario.client.params
        self.client_params = client if isinstance(client, DPSGDParams) else None
        self.current = ArrayRecord()
        self.clients: dict[int, dict[str, Any]] = {}
        self.exhausted: dict[int, int] = {}
        self.pending: dict[int, Any] = {}
        self.unreleased: list[int] = []
        self._noise_key: NoiseKey | None = None

    # -- randomness ---------------------------------------------------------------------------
    def bind_noise_key(self, key: NoiseKey | None) -> None:
        """The run's secret key: user-level noise and client draws under ``noise = "secret"``."""
        self._noise_key = key

    def round_seed(self, purpose: str, server_round: int) -> int:
        """The seed of a server-side draw: from the secret key, or from ``run.seed`` (replayable).

        A secret-mode report without a bound key draws its own from OS entropy
        the first time (never falls back to the scenario's seed).
        """
        if self.user_dp is not None and self.user_dp.noise == "secret":
            if self._noise_key is None:
                self._noise_key = NoiseKey.new()
            return self._noise_key.seed(PURPOSES[purpose], server_round)
        return derive_seed(self.scenario.run.seed, server_round, 0, PURPOSES[purpose])

    # -- selection ----------------------------------------------------------------------------
    def select_clients(
        self, server_round: int, available: list[int], *, query: Any
    ) -> list[int] | None:
        """The round's clients: Poisson at q, or m without replacement from the secret key.

        ``sampling = "fixed"`` with ``noise = "replayable"`` (and runs without
        ``[user_dp]``) leave the draw to the wrapped strategy or the round loop.
        """
        pick = _SELECT.get(self.user_dp.sampling) if self.user_dp is not None else None
        chosen = pick(self, server_round, available) if pick is not None else None
        if chosen is None:
            inner = find_hook(self.strategy, "select_clients")
            return inner(server_round, available, query=query) if inner is not None else None
        return chosen

    def _poisson_clients(self, server_round: int, available: list[int]) -> list[int]:
        chosen = poisson_select(
            available,
            num_clients=self.scenario.partition.num_clients,
            sample_rate=self.user_dp.sample_rate(self.scenario),
            seed=self.round_seed("poisson_select", server_round),
        )
        if not chosen:  # the round still releases noise: release_empty_round must follow
            self.unreleased.append(int(server_round))
        return chosen

    def _fixed_clients(self, server_round: int, available: list[int]) -> list[int] | None:
        if self.user_dp.noise != "secret":
            return None  # the round loop's draw from run.seed, as in a non-private run
        return fixed_select(
            available,
            size=self.scenario.clients_per_round,
            seed=self.round_seed("fixed_select", server_round),
        )

    # -- the round ----------------------------------------------------------------------------
    def _event(self, sampled: int) -> Any:
        """The dp-accounting event of a round that drew ``sampled`` clients."""
        p, dp = self.user_dp, self.dp
        count = float(dp.clipped_count_stddev) if p.adaptive else None
        sigma = p.scheme.round_sigma(
            update_multiplier=float(dp.noise_multiplier), count_stddev=count
        )
        return round_event(
            p.sampling,
            sigma=sigma,
            population=self.scenario.partition.num_clients,
            sample_size=sampled,
            sample_rate=p.sample_rate(self.scenario),
        )

    def _admit(self, server_round: int, *, sampled: int) -> Any:
        """Check the round against the cap before anything of it is released; keep its event."""
        if self.unreleased and self.unreleased[-1] < server_round:
            raise RunError(
                f"round {self.unreleased[-1]} drew no clients and the round loop did not call "
                "release_empty_round: that round's release would be unaccounted"
            )
        event = self._event(sampled)
        self.user.admit(server_round=server_round, event=event)
        self.pending[int(server_round)] = event
        return event

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.user is not None:
            self._admit(server_round, sampled=len(messages))
        return messages

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
        if self.user is None:
            if not kept:
                return self.current, MetricRecord(out)
            arrays, metrics = self.strategy.aggregate_train(server_round, kept)
            return arrays, MetricRecord({**out, **_row_metrics(metrics)})
        return _RELEASE[self.user_dp.sampling](self, server_round, kept, out)

    def _release_fixed(
        self, server_round: int, kept: list[Message], out: dict[str, Any]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Flower's wrapper averages the m' replies and adds z·C/m' noise (seeded)."""
        event = self.pending.pop(int(server_round), None)
        if not kept:  # every reply left out (budgets spent): nothing released
            return self.current, MetricRecord(out)
        event = event if event is not None else self._admit(server_round, sampled=len(kept))
        clip = float(self.dp.clipping_norm)
        with _unit_weights(kept), seeded_numpy(self.round_seed("noise", server_round)):
            arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        out.update(_row_metrics(metrics))
        if arrays is not None:
            self._account(server_round, event, clip, out)
        return arrays, MetricRecord(out)

    def _release_poisson(
        self, server_round: int, kept: list[Message], out: dict[str, Any]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """(Σ clipped updates + N(0, (zC)²)) / (qN) added to the model, however many replied."""
        r = int(server_round)
        event = self.pending.pop(r, None)
        event = event if event is not None else self._admit(r, sampled=len(kept))
        p, dp = self.user_dp, self.dp
        if kept:
            with _unit_weights(kept):
                _, metrics = dp.strategy.aggregate_train(r, kept)  # the rows' metrics only
            out.update(_row_metrics(metrics))
        clip = float(dp.clipping_norm)
        rng = np.random.default_rng(self.round_seed("noise", r))
        denominator = float(self.scenario.clients_per_round)  # q·N
        new, bits = noised_sum_release(
            self.current.to_numpy_ndarrays(),
            [_arrays_of(reply).to_numpy_ndarrays() for reply in kept],
            clip=clip,
            noise_std=float(dp.noise_multiplier) * clip,
            denominator=denominator,
            rng=rng,
        )
        if p.adaptive:
            if p.clipping == "client_adaptive":
                bits = [_client_bits(reply) for reply in kept]
            dp.clipping_norm = adapted_clip(
                clip,
                unclipped=len(bits) - sum(bits),
                replies=len(bits),
                count_stddev=float(dp.clipped_count_stddev),
                denominator=denominator,
                target_quantile=p.target_clipped_quantile,
                lr=p.clip_norm_lr,
                rng=rng,
            )
        arrays = ArrayRecord(dict(zip(self.current.keys(), (Array(a) for a in new), strict=True)))
        self._account(r, event, clip, out)
        return arrays, MetricRecord(out)

    def release_empty_round(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, MetricRecord]:
        """A round that drew no clients: under Poisson sampling it still releases the noise.

        The model moves by N(0, (zC)²)/(qN) and the round is accounted like any
        other; otherwise (no user-level DP, or fixed sampling) nothing is released.
        """
        if server_round in self.unreleased:
            self.unreleased.remove(server_round)
        if self.user is None or self.user_dp.sampling != "poisson":
            return arrays, MetricRecord()
        self.current = arrays
        return self._release_poisson(server_round, [], {})

    def _account(self, server_round: int, event: Any, clip: float, out: dict[str, Any]) -> None:
        out["user_epsilon"] = self.user.record(server_round=server_round, event=event)
        out["user_noise_multiplier"] = float(event.event.noise_multiplier)
        out["user_clipping_norm"] = clip

    # -- summary ------------------------------------------------------------------------------
    def summary_extra(self) -> dict[str, Any]:
        """The run's privacy facts for summary.json, plus the wrapped strategy's own."""
        out = super().summary_extra()
        privacy: dict[str, Any] = {}
        if self.client_params is not None:
            privacy["sample_level"] = sample_level_summary(self)
        if self.user is not None:
            privacy["user_level"] = user_level_summary(self)
        out["privacy"] = privacy
        return out


def _row_metrics(metrics: Any) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if k not in _CLIENT_ONLY}


_SELECT = MappingProxyType(
    {"poisson": PrivacyReport._poisson_clients, "fixed": PrivacyReport._fixed_clients}
)
_RELEASE = MappingProxyType(
    {"poisson": PrivacyReport._release_poisson, "fixed": PrivacyReport._release_fixed}
)
