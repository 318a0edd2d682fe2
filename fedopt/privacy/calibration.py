"""Noise calibration: the σ that meets a target (ε, δ) for a plan of Poisson-Gaussian steps.

Opacus's accountants calibrate with Opacus's own ``get_noise_multiplier``
(doubling, then bisection). Any other registered accountant (``pld``, a
user's) is calibrated here by the same doubling-then-bisection search on its
``get_epsilon``, because dp-accounting offers no calibration for a
subsampled Gaussian of a given number of steps. The answer is always on the
safe side: its ε is at most the target and within ``tolerance`` of it.
"""

from __future__ import annotations

import functools
import math

from fedopt.errors import ConfigError
from fedopt.privacy.accountants import PrivacyError, make_accountant

__all__ = ["MAX_SIGMA", "PrivacyTargetError", "calibrate_noise", "epsilon_for"]

#: Largest σ the search tries before calling a target unreachable (Opacus's limit).
MAX_SIGMA = 1e6


class PrivacyTargetError(ConfigError):
    """A target ε that no noise multiplier reaches for the plan (or that is malformed)."""

    def __init__(self, key: str, value: float, plan: str) -> None:
        super().__init__(key, value, f"a target reachable for {plan}")


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after ``steps`` Poisson-Gaussian steps (σ, q) at ``delta``, by the named accountant."""
    acc = make_accountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return acc.get_epsilon(delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    key: str = "target_epsilon",
) -> float:
    """The smallest σ found whose ε for ``steps`` steps at rate q is at most ``target_epsilon``.

    Parameters
    ----------
    target_epsilon, delta : float
        The budget.
    sample_rate : float
        Poisson sampling rate q of each step.
    steps : int
        Planned number of steps (the worst-case participation of a client).
    accountant : str
        A registered accountant name.
    tolerance : float
        The returned σ has ``target - tolerance <= ε(σ) <= target``.
    key : str
        Scenario key named by the error.

    Raises
    ------
    PrivacyTargetError
        When no σ up to :data:`MAX_SIGMA` reaches the target.
    """
    plan = f"q = {sample_rate:g}, {steps} steps, δ = {delta:g} ({accountant})"
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyTargetError(key, target_epsilon, plan + " (ε must be > 0)")
    cls = type(make_accountant(accountant))
    try:
        return _calibrate(
            cls, accountant, target_epsilon, delta, sample_rate, int(steps), tolerance
        )
    except PrivacyError as err:
        raise PrivacyTargetError(key, target_epsilon, f"{plan}: {err}") from None


@functools.lru_cache(maxsize=1024)
def _calibrate(
    cls: type, name: str, target: float, delta: float, q: float, steps: int, tolerance: float
) -> float:
    """The search itself, memoised per accountant class: a pure function of its arguments."""
    sigma = cls().calibrate(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, tolerance=tolerance
    )
    if sigma is None:
        sigma = _bisect(name, target, delta, q, steps, tolerance)
    return float(sigma)


def _bisect(
    accountant: str, target: float, delta: float, q: float, steps: int, tolerance: float
) -> float:
    def eps(sigma: float) -> float:
        return epsilon_for(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant
        )

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise PrivacyError(f"no σ up to {MAX_SIGMA:g} reaches it")
        eps_high = eps(high)
    while target - eps_high > tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target:
            high, eps_high = mid, e
        else:
            low = mid
    return high
