"""User-level accounting with dp-accounting: each round's event, the ledger, the cap, calibration.

Every released round of a ``[user_dp]`` run is one dp-accounting ``DpEvent``:

- ``sampling = "poisson"``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
  under add/remove-one-client adjacency (dp-accounting's ``ADD_OR_REMOVE_ONE``);
- ``sampling = "fixed"``: ``SampledWithoutReplacementDpEvent(N, k,
  GaussianDpEvent(z / 2))`` under replace-one-client adjacency
  (``REPLACE_ONE``), k the clients drawn that round.

The Gaussian's multiplier is always the noise standard deviation over the
round's true sensitivity under that adjacency. :class:`UserLevelLedger`
composes the events with dp-accounting's own accountants (``rdp``:
``dp_accounting.rdp.RdpAccountant`` with its default orders; ``pld``:
``dp_accounting.pld.PLDAccountant``), so the ε it reports is the one a third
party gets by composing the events written into ``summary.json`` (see
:func:`event_to_dict`). With a ``target_epsilon`` the ledger is a cap:
:meth:`UserLevelLedger.admit` refuses a round whose release would pass it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedopt.errors import RunError
from fedopt.privacy.calibration import MAX_SIGMA, PrivacyTargetError

__all__ = [
    "ACCOUNTANTS_FOR",
    "RELATIONS",
    "UserBudgetError",
    "UserLevelLedger",
    "calibrate_user_noise",
    "event_to_dict",
    "round_event",
]

if TYPE_CHECKING:  # dp-accounting takes seconds to import: only the functions that use it do
    import dp_accounting

#: The name of dp-accounting's ``NeighboringRelation`` of each sampling scheme.
RELATIONS: Mapping[str, str] = MappingProxyType(
    {"poisson": "ADD_OR_REMOVE_ONE", "fixed": "REPLACE_ONE"}
)
#: The ``user_dp.accountant`` names that can compose each scheme's event.
ACCOUNTANTS_FOR: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"poisson": ("rdp", "pld"), "fixed": ("rdp",)}
)
#: Relative slack of the cap, for float rounding only.
CAP_TOLERANCE = 1e-9


def _poisson(*, sigma: float, population: int, sample_size: int, sample_rate: float) -> Any:
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))


def _without_replacement(
    *, sigma: float, population: int, sample_size: int, sample_rate: float
) -> Any:
    import dp_accounting

    return dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(sigma)
    )


_EVENTS: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {"poisson": _poisson, "fixed": _without_replacement}
)


def round_event(
    sampling: str, *, sigma: float, population: int, sample_size: int, sample_rate: float
) -> dp_accounting.DpEvent:
    """The dp-accounting event of one released round (``sigma`` in units of the sensitivity)."""
    return _EVENTS[sampling](
        sigma=float(sigma),
        population=int(population),
        sample_size=int(sample_size),
        sample_rate=float(sample_rate),
    )


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """A JSON form of a dp-accounting event: its class name and its attributes, nested.

    ``getattr(dp_accounting, d["class_name"])(**fields)`` (inner events first)
    rebuilds it.
    """
    import attr
    import dp_accounting

    out: dict[str, Any] = {"class_name": type(event).__name__}
    for field in attr.fields(type(event)):
        value = getattr(event, field.name)
        out[field.name] = (
            event_to_dict(value) if isinstance(value, dp_accounting.DpEvent) else value
        )
    return out


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp-accounting's notes about RDP orders it drops (dropping one only raises ε)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=512)
def _rdp_curve(event: dp_accounting.DpEvent, relation: str) -> np.ndarray:
    """The RDP curve of one event at dp-accounting's default orders (computed once per event)."""
    import dp_accounting

    rel = dp_accounting.NeighboringRelation[relation]
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=rel)
    with _quiet_absl():
        acc.compose(event)
    curve = np.array(acc._rdp, dtype=np.float64)  # noqa: SLF001  (the curve the accountant sums)
    curve.setflags(write=False)
    return curve


Runs = Sequence[tuple[Any, int]]  # (dp-accounting event, count)


def _rdp_epsilon(runs: Runs, relation: str, delta: float) -> float:
    """ε of ``(event, count)`` runs, summed as ``RdpAccountant.compose(event, count)`` does."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    total = np.zeros(len(rdp_lib.DEFAULT_RDP_ORDERS), dtype=np.float64)
    for event, count in runs:
        total += count * _rdp_curve(event, relation)
    return float(rdp_lib.compute_epsilon(rdp_lib.DEFAULT_RDP_ORDERS, total, delta)[0])


def _pld_epsilon(runs: Runs, relation: str, delta: float) -> float:
    """ε of ``(event, count)`` runs by dp-accounting's PLD accountant (grid 1e-4)."""
    import dp_accounting

    rel = dp_accounting.NeighboringRelation[relation]
    acc = dp_accounting.pld.PLDAccountant(neighboring_relation=rel)
    for event, count in runs:
        acc.compose(event, count)
    return float(acc.get_epsilon(delta))


#: ε of a list of ``(event, count)`` runs, by ``user_dp.accountant``.
EPSILON: Mapping[str, Callable[[Runs, str, float], float]] = MappingProxyType(
    {"rdp": _rdp_epsilon, "pld": _pld_epsilon}
)
#: The dp-accounting class behind each name, as the summary states it.
ACCOUNTANT_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "rdp": "dp_accounting.rdp.RdpAccountant (default orders)",
        "pld": "dp_accounting.pld.PLDAccountant (value_discretization_interval = 1e-4)",
    }
)


class UserBudgetError(RunError):
    """A round whose release would take user-level ε past ``user_dp.target_epsilon``."""

    def __init__(self, server_round: int, epsilon: float, target: float) -> None:
        self.round = server_round
        self.epsilon = epsilon
        self.target = target
        super().__init__(
            f"round {server_round} was not released: its user-level release would bring ε to "
            f"{epsilon:.6g}, past user_dp.target_epsilon = {target:g}"
        )


class UserLevelLedger:
    """The user-level events of a run, composed by dp-accounting, capped at a target ε.

    Parameters
    ----------
    accountant : {"rdp", "pld"}
        Which dp-accounting accountant composes the events.
    sampling : {"poisson", "fixed"}
        The scheme, which fixes the neighbouring relation.
    delta : float
        δ of the reported ε.
    target_epsilon : float or None
        The cap; None: no cap (the noise multiplier was given).
    """

    def __init__(
        self,
        *,
        accountant: str,
        sampling: str,
        delta: float,
        target_epsilon: float | None = None,
    ) -> None:
        self.accountant = accountant
        self.sampling = sampling
        self.relation = RELATIONS[sampling]
        self.delta = delta
        self.target_epsilon = target_epsilon
        #: ``[event, count, first round, last round]`` runs of consecutive equal events.
        self.runs: list[list[Any]] = []
        self.epsilon = 0.0
        self._admitted: dict[int, tuple[dp_accounting.DpEvent, float]] = {}

    def _epsilon(self, runs: Runs) -> float:
        with _quiet_absl():
            return EPSILON[self.accountant](runs, self.relation, self.delta)

    def epsilon_after(self, event: dp_accounting.DpEvent) -> float:
        """ε the ledger would report once ``event`` is composed."""
        runs = [(e, n) for e, n, _, _ in self.runs]
        if runs and runs[-1][0] == event:
            runs[-1] = (event, runs[-1][1] + 1)
        else:
            runs.append((event, 1))
        return self._epsilon(runs)

    def admit(self, *, server_round: int, event: dp_accounting.DpEvent) -> float:
        """ε after round ``server_round``'s event; refuse it when it would pass the cap.

        Raises
        ------
        UserBudgetError
            When ε after the round exceeds ``target_epsilon`` by more than float rounding.
        """
        eps = self.epsilon_after(event)
        cap = self.target_epsilon
        if cap is not None and eps > cap * (1 + CAP_TOLERANCE):
            raise UserBudgetError(server_round, eps, cap)
        self._admitted[int(server_round)] = (event, eps)
        return eps

    def record(self, *, server_round: int, event: dp_accounting.DpEvent) -> float:
        """Compose the released round's event (admitting it first if needed); return ε so far."""
        r = int(server_round)
        admitted = self._admitted.pop(r, None)
        if admitted is None or admitted[0] != event:
            self.admit(server_round=r, event=event)
            admitted = self._admitted.pop(r)
        eps = admitted[1]
        if self.runs and self.runs[-1][0] == event:
            self.runs[-1][1] += 1
            self.runs[-1][3] = r
        else:
            self.runs.append([event, 1, r, r])
        self.epsilon = eps
        return eps

    @property
    def rounds(self) -> int:
        """How many rounds were released (and composed)."""
        return sum(n for _, n, _, _ in self.runs)

    def summary(self) -> dict[str, Any]:
        """The accounting facts for summary.json: every event, enough to recompute ε."""
        return {
            "accountant": self.accountant,
            "accountant_class": ACCOUNTANT_CLASSES[self.accountant],
            "neighboring_relation": self.relation,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "events": [
                {"rounds": [first, last], "count": n, "event": event_to_dict(e)}
                for e, n, first, last in self.runs
            ],
            "rounds_released": self.rounds,
            "epsilon": self.epsilon,
            "recompute": (
                f"acc = {ACCOUNTANT_CLASSES[self.accountant].split(' ')[0]}(neighboring_relation="
                f"dp_accounting.NeighboringRelation.{self.relation}); for each entry of "
                "events, rebuild the event (getattr(dp_accounting, class_name)(**fields), "
                "inner event first) and acc.compose(event, count); acc.get_epsilon(delta)"
            ),
        }


def calibrate_user_noise(
    *,
    sampling: str,
    accountant: str,
    target_epsilon: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    sigma_scale: float,
    tolerance: float = 0.01,
    key: str = "user_dp.target_epsilon",
) -> float:
    """The smallest z found whose run of ``rounds`` round events has ε within the target.

    The round's Gaussian has multiplier ``sigma_scale · z`` (1 for poisson,
    1/2 for fixed), the event and accountant are the ones the ledger uses, so
    a run that releases as planned ends with ``target - tolerance <= ε <=
    target``.

    Raises
    ------
    PrivacyTargetError
        When no z up to :data:`~fedopt.privacy.calibration.MAX_SIGMA` reaches the target.
    """
    plan = (
        f"{sampling} sampling of {sample_size} of {population} clients, {rounds} rounds, "
        f"δ = {delta:g} ({accountant})"
    )
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyTargetError(key, target_epsilon, plan + " (ε must be > 0)")
    z = _calibrate(
        sampling, accountant, float(target_epsilon), float(delta), int(population),
        int(sample_size), int(rounds), float(sigma_scale), float(tolerance),
    )  # fmt: skip
    if z is None:
        raise PrivacyTargetError(key, target_epsilon, f"{plan}: no z up to {MAX_SIGMA:g}")
    return z


@functools.lru_cache(maxsize=256)
def _calibrate(
    sampling: str,
    accountant: str,
    target: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    sigma_scale: float,
    tolerance: float,
) -> float | None:
    """Doubling, then bisection on z, of the ledger's own ε (memoised: a pure function)."""
    ledger = UserLevelLedger(accountant=accountant, sampling=sampling, delta=delta)

    def eps(z: float) -> float:
        event = round_event(
            sampling,
            sigma=sigma_scale * z,
            population=population,
            sample_size=sample_size,
            sample_rate=sample_size / population,
        )
        return ledger._epsilon([(event, rounds)])

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            return None
        eps_high = eps(high)
    while target - eps_high > tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target:
            high, eps_high = mid, e
        else:
            low = mid
    return high
