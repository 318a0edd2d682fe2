"""System heterogeneity: client speed models, per-round availability and the virtual clock.

Speed models are registered in :data:`fedopt.registry.SPEEDS`; each maps its
params dataclass and a numpy generator to relative client speeds (1.0 is
nominal, 2.0 is twice as fast). The :class:`VirtualClock` turns a client's
update into simulated seconds under a duration model of :data:`DURATIONS`:
``work`` (the default) divides the examples processed by ``base_rate * speed``;
``speed`` makes an update last ``1 / speed`` whatever its work, the FedFix
code's τ_i, which depends on the speed spread only. Every speed model's
parameters carry the choice as ``duration`` (:class:`ClockParams`), so a
scenario writes ``heterogeneity.duration = "speed"``. The clock never sleeps
and never reads wall time, so simulated time is exactly reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from fedopt.params import check
from fedopt.registry import SPEEDS

__all__ = [
    "DURATIONS",
    "ClockParams",
    "ConstantParams",
    "FxParams",
    "LognormalParams",
    "TwoTierParams",
    "VirtualClock",
    "availability",
    "client_speeds",
    "duration_model",
]


def work_duration(work: float, *, base_rate: float, speed: float) -> float:
    """``work`` examples at ``base_rate * speed`` examples per simulated second."""
    return float(work) / (base_rate * speed)


def speed_duration(work: float, *, base_rate: float, speed: float) -> float:
    """One update lasts ``1 / speed`` simulated seconds, whatever its work (FedFix's τ_i)."""
    return 1.0 / speed


#: Duration models of the :class:`VirtualClock`: name -> ``f(work, *, base_rate, speed)``.
DURATIONS: Mapping[str, Callable[..., float]] = MappingProxyType(
    {"work": work_duration, "speed": speed_duration}
)


@dataclass(frozen=True)
class ClockParams:
    """What every speed model's parameters share: the clock's duration model.

    Attributes
    ----------
    duration : str
        ``work``: an update lasts examples processed / (base_rate * speed), so
        clients with less data finish sooner; ``speed``: it lasts 1 / speed
        simulated seconds whatever its work (the FedFix code's τ_i: under
        ``fx`` exactly 1 - i X / 100 / (M - 1), F-0 homogeneous).
    """

    duration: Literal["work", "speed"] = "work"

    def __post_init__(self) -> None:
        check(
            self.duration in DURATIONS, "duration", self.duration, "one of " + ", ".join(DURATIONS)
        )


@dataclass(frozen=True)
class ConstantParams(ClockParams):
    """Parameters of the ``constant`` speed model: only the clock's duration model."""


@dataclass(frozen=True)
class LognormalParams(ClockParams):
    """Parameters of the ``lognormal`` speed model: log-speeds are N(0, sigma^2)."""

    sigma: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.sigma < math.inf, "sigma", self.sigma, "a finite number >= 0")


@dataclass(frozen=True)
class TwoTierParams(ClockParams):
    """Parameters of the ``two_tier`` speed model.

    Attributes
    ----------
    slow_fraction : float
        Fraction of clients that are slow, in [0, 1].
    slow_factor : float
        Speed of a slow client, in (0, 1].
    """

    slow_fraction: float = 0.5
    slow_factor: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            0.0 <= self.slow_fraction <= 1.0,
            "slow_fraction",
            self.slow_fraction,
            "a number in [0, 1]",
        )
        check(0.0 < self.slow_factor <= 1.0, "slow_factor", self.slow_factor, "a number in (0, 1]")


@dataclass(frozen=True)
class FxParams(ClockParams):
    """Parameters of the ``fx`` speed model: per-unit times spread linearly by X percent."""

    spread: float = 80.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.spread < 100.0, "spread", self.spread, "a percentage in [0, 100)")


def constant_speeds(
    params: ConstantParams, *, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
    """Homogeneous clients: every speed is 1."""
    return np.ones(num_clients, dtype=np.float64)


def lognormal_speeds(
    params: LognormalParams, *, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
    """Log-normally distributed speeds with median 1."""
    return rng.lognormal(0.0, params.sigma, num_clients).astype(np.float64)


def two_tier_speeds(
    params: TwoTierParams, *, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
    """A random subset of round(slow_fraction * M) clients runs at slow_factor, the rest at 1."""
    speeds = np.ones(num_clients, dtype=np.float64)
    num_slow = round(params.slow_fraction * num_clients)
    speeds[rng.permutation(num_clients)[:num_slow]] = params.slow_factor
    return speeds


def fx_speeds(params: FxParams, *, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Deterministic F-X spread: client i has per-unit time 1 - i * (X / 100) / (M - 1)."""
    if num_clients == 1:
        return np.ones(1, dtype=np.float64)
    tau = 1.0 - np.arange(num_clients, dtype=np.float64) * (params.spread / 100.0) / (
        num_clients - 1
    )
    return 1.0 / tau


SPEEDS.register("constant", constant_speeds, params=ConstantParams)
SPEEDS.register("lognormal", lognormal_speeds, params=LognormalParams)
SPEEDS.register("two_tier", two_tier_speeds, params=TwoTierParams)
SPEEDS.register("fx", fx_speeds, params=FxParams)


def client_speeds(name: str, params: Any, *, num_clients: int, seed: int) -> np.ndarray:
    """Relative speeds of ``num_clients`` clients under the speed model ``name``.

    Parameters
    ----------
    name : str
        A name registered in ``SPEEDS``.
    params : dataclass or None
        The speed model's params dataclass instance (None: its defaults).
    num_clients : int
        Number of clients M (>= 1).
    seed : int
        Run seed; the draw uses ``np.random.default_rng([seed, 7919])``.

    Returns
    -------
    numpy.ndarray
        Float64 speeds, all > 0, one per client.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    entry = SPEEDS.get(name, key="heterogeneity.speed")
    if params is None:
        params = entry.params()
    rng = np.random.default_rng([seed, 7919])
    return np.asarray(entry.obj(params, num_clients=num_clients, rng=rng), dtype=np.float64)


def duration_model(params: Any) -> str:
    """The duration model a speed model's ``params`` choose (``work`` for params without one)."""
    return params.duration if isinstance(params, ClockParams) else "work"


def availability(num_clients: int, *, probability: float, seed: int, round_: int) -> np.ndarray:
    """Boolean mask of the clients available in round ``round_``.

    Each client is available independently with ``probability``; the draw
    depends only on ``(seed, round_)``. Probability 1 draws nothing.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"availability probability must be in [0, 1], got {probability}")
    if probability >= 1.0:
        return np.ones(num_clients, dtype=bool)
    rng = np.random.default_rng([seed, round_, 104729])
    return rng.random(num_clients) < probability


@dataclass(eq=False)
class VirtualClock:
    """Simulated time: an update's duration follows ``duration_model``; a round, its slowest one.

    Under ``work`` a client update lasts ``work / (base_rate * speed)`` simulated
    seconds; under ``speed`` it lasts ``1 / speed`` (base_rate unused). A
    synchronous round lasts as long as its slowest participant.

    Attributes
    ----------
    speeds : numpy.ndarray
        Relative speed of each client (> 0).
    base_rate : float
        Examples per simulated second at speed 1.0.
    now : float
        Current simulated time in seconds.
    duration_model : str
        A name in :data:`DURATIONS`: ``work`` or ``speed``.
    """

    speeds: np.ndarray
    base_rate: float = 100.0
    now: float = 0.0
    duration_model: str = "work"

    def __post_init__(self) -> None:
        self.speeds = np.asarray(self.speeds, dtype=np.float64)
        if self.speeds.ndim != 1 or not np.all(np.isfinite(self.speeds) & (self.speeds > 0)):
            raise ValueError("speeds must be a 1-d array of finite numbers > 0")
        if not (0.0 < self.base_rate < math.inf):
            raise ValueError(f"base_rate must be a finite number > 0, got {self.base_rate}")
        if self.duration_model not in DURATIONS:
            raise ValueError(
                f"duration_model must be one of {', '.join(DURATIONS)}, got {self.duration_model!r}"
            )

    def duration(self, cid: int, work: float) -> float:
        """Simulated seconds client ``cid`` needs for an update of ``work`` examples."""
        if work < 0:
            raise ValueError(f"work must be >= 0, got {work}")
        f = DURATIONS[self.duration_model]
        return f(float(work), base_rate=self.base_rate, speed=float(self.speeds[cid]))

    def finish_round(self, durations: Mapping[int, float]) -> float:
        """Advance ``now`` by the slowest duration of a synchronous round and return it."""
        length = max((float(d) for d in durations.values()), default=0.0)
        self.now += length
        return length

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-able snapshot of the clock."""
        return {
            "speeds": [float(s) for s in self.speeds],
            "base_rate": float(self.base_rate),
            "now": float(self.now),
            "duration_model": self.duration_model,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot made by :meth:`state_dict`."""
        self.speeds = np.asarray(state["speeds"], dtype=np.float64)
        self.base_rate = float(state["base_rate"])
        self.now = float(state["now"])
        self.duration_model = str(state.get("duration_model", "work"))
