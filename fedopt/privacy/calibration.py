"""Noise calibration: the σ that meets a target (ε, δ) for a plan of Poisson-Gaussian steps.

``rdp`` calibrates with Opacus's own ``get_noise_multiplier``. Every other
registered accountant (``prv``, ``gdp``, ``pld``, a user's) is calibrated here
by the same search on its own guarded ``get_epsilon``: σ doubles from 20 until
ε is at most the target (giving up past :data:`MAX_SIGMA`), then bisects down
until ε is within ``tolerance`` below it. The answer is always on the safe
side: its ε is at most the target.

Whether a target is reachable at all is decided by one ε: the search can only
accept a σ up to :data:`LARGEST_SIGMA`, and (for a monotone accountant) ε
does not grow with σ, so the target is reachable exactly when ε at that σ is
at most the target.
:func:`check_reachable` asks that one question (it is how a run refuses an
unreachable target before it starts), and :func:`calibrate_noise` gives the
same answer, with the same message, when its search fails.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from fedopt.errors import ConfigError
from fedopt.privacy.accountants import PrivacyError, make_accountant

__all__ = [
    "LARGEST_SIGMA",
    "MAX_SIGMA",
    "PrivacyTargetError",
    "calibrate_noise",
    "check_reachable",
    "epsilon_for",
]

#: Largest σ the search tries before calling a target unreachable (Opacus's limit).
MAX_SIGMA = 1e6

#: The search doubles σ from here (first trying 20), as Opacus's ``get_noise_multiplier``.
_SIGMA_START = 10.0

#: The largest σ the search can accept: the last doubling of 10 within MAX_SIGMA (655360).
LARGEST_SIGMA = _SIGMA_START * 2 ** math.floor(math.log2(MAX_SIGMA / _SIGMA_START))

#: The rate of the lower bound on ε (a fraction of the client's q), for monotone accountants.
_LOW_RATE = 1e-6


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


def _plan(where: str, delta: float, q: float, steps: int, accountant: str) -> str:
    text = f"q = {q:g}, {steps} steps, δ = {delta:g} ({accountant})"
    return f"{where}: {text}" if where else text


def _checked(
    target: float, delta: float, q: float, steps: int, accountant: str, key: str, where: str
) -> tuple[type, str]:
    """(accountant class, plan in words) of a well-formed request; else a PrivacyTargetError."""
    plan = _plan(where, delta, q, steps, accountant)
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise PrivacyTargetError(key, target, plan + " (ε must be a finite number > 0)")
    if not 0.0 < delta < 1.0:
        raise PrivacyTargetError(key, target, plan + f" (δ = {delta!r} must be in (0, 1))")
    if not 0.0 < q <= 1.0:
        raise PrivacyTargetError(key, target, plan + f" (q = {q!r} must be in (0, 1])")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise PrivacyTargetError(key, target, plan + f" (steps = {steps!r} must be >= 1)")
    return type(make_accountant(accountant)), plan


@functools.lru_cache(maxsize=4096)
def _floor(cls: type, delta: float, q: float, steps: int) -> float:
    """ε at LARGEST_SIGMA: the smallest ε the search can reach (a pure memo per class)."""
    acc = cls()
    acc.step(noise_multiplier=LARGEST_SIGMA, sample_rate=q, num_steps=steps)
    return acc.get_epsilon(delta)


def _bounds(cls: type, target: float, delta: float, q: float, steps: int) -> str | None:
    """Reachability from ε's bounds in q: "" (reachable), why not, or None (left open).

    For a monotone accountant, ε at q = 1 bounds it from above and ε at q·10⁻⁶
    from below; both are cheap where the client's own q can be slow (Opacus's
    RDP series at σ = 655360 and q = 0.5 takes seconds).
    """
    if not getattr(cls, "monotone", False):
        return None
    try:
        if _floor(cls, delta, 1.0, steps) <= target:
            return ""
        low = _floor(cls, delta, q * _LOW_RATE, steps)
    except PrivacyError:
        return None
    if low > target:
        return f"no σ up to {LARGEST_SIGMA:g} reaches it (ε >= {low:.4g} there)"
    return None


def _unreachable(cls: type, target: float, delta: float, q: float, steps: int) -> str | None:
    """Why no σ the search tries reaches ``target``, or None when one does."""
    bound = _bounds(cls, target, delta, q, steps)
    if bound is not None:
        return bound or None
    try:
        floor = _floor(cls, delta, q, steps)
    except PrivacyError as err:
        return f"no σ up to {LARGEST_SIGMA:g} gives an ε ({err})"
    if floor <= target:
        return None
    return f"no σ up to {LARGEST_SIGMA:g} reaches it (ε = {floor:.4g} there)"


def check_reachable(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    key: str = "target_epsilon",
    where: str = "",
) -> None:
    """Raise exactly when :func:`calibrate_noise` would find no σ, at the cost of one ε.

    For a monotone accountant (:attr:`~fedopt.privacy.accountants.Accountant.monotone`)
    the answer is ε at :data:`LARGEST_SIGMA`, bounded first by ε at q = 1 and at
    q·10⁻⁶; for any other it is the search itself (memoised, so a later
    :func:`calibrate_noise` of the same plan in this process is free).

    Parameters
    ----------
    target_epsilon, delta, sample_rate, steps, accountant, tolerance, key
        As :func:`calibrate_noise`.
    where : str
        Whose plan it is (e.g. ``"client 3 (n_k = 22)"``), named by the error.

    Raises
    ------
    PrivacyTargetError
        When no σ up to :data:`LARGEST_SIGMA` reaches the target, or the request is malformed.
    """
    q, n = float(sample_rate), int(steps)
    cls, plan = _checked(target_epsilon, delta, q, n, accountant, key, where)
    if not getattr(cls, "monotone", False):  # only the search itself can tell
        calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=n,
            accountant=accountant,
            tolerance=tolerance,
            key=key,
            where=where,
        )
        return
    reason = _unreachable(cls, float(target_epsilon), float(delta), q, n)
    if reason is not None:
        raise PrivacyTargetError(key, target_epsilon, f"{plan}: {reason}")


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    key: str = "target_epsilon",
    where: str = "",
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
    where : str
        Whose plan it is, named by the error.

    Raises
    ------
    PrivacyTargetError
        When no σ up to :data:`LARGEST_SIGMA` reaches the target (the same
        answer and message as :func:`check_reachable`), or the request is malformed.
    """
    q, n, target = float(sample_rate), int(steps), float(target_epsilon)
    cls, plan = _checked(target_epsilon, delta, q, n, accountant, key, where)
    if reason := _bounds(cls, target, float(delta), q, n):  # unreachable: no search needed
        raise PrivacyTargetError(key, target_epsilon, f"{plan}: {reason}")
    try:
        return _calibrate(cls, accountant, target, float(delta), q, n, float(tolerance))
    except PrivacyError as err:
        reason = _unreachable(cls, target, float(delta), q, n) or str(err)
        raise PrivacyTargetError(key, target_epsilon, f"{plan}: {reason}") from None


@functools.lru_cache(maxsize=1024)
def _calibrate(
    cls: type, name: str, target: float, delta: float, q: float, steps: int, tolerance: float
) -> float:
    """The search itself, memoised per accountant class: a pure function of its arguments."""
    sigma = cls().calibrate(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, tolerance=tolerance
    )
    if sigma is None:

        def eps(s: float) -> float:
            return epsilon_for(
                noise_multiplier=s, sample_rate=q, steps=steps, delta=delta, accountant=name
            )

        sigma = _search(eps, target, tolerance)
    return float(sigma)


def _try(eps: Callable[[float], float], sigma: float) -> tuple[float, str]:
    """(ε, "") at σ, or (inf, why) when the accountant cannot answer there (never accepted)."""
    try:
        return eps(sigma), ""
    except PrivacyError as err:
        return math.inf, str(err)


def _search(eps: Callable[[float], float], target: float, tolerance: float) -> float:
    """Opacus's ``get_noise_multiplier`` search on ``eps``: double σ from 20, then bisect.

    A σ whose ε cannot be computed counts as above the target, so the answer
    is always a σ whose ε was computed and is below the target.
    """
    low, high, eps_high, why = 0.0, _SIGMA_START, math.inf, ""
    while eps_high > target:
        high *= 2
        if high > MAX_SIGMA:
            raise PrivacyError(f"no σ up to {LARGEST_SIGMA:g} reaches it" + (why and f" ({why})"))
        eps_high, why = _try(eps, high)
    while target - eps_high > tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        e, _ = _try(eps, mid)
        if e < target:
            high, eps_high = mid, e
        else:
            low = mid
    return high
