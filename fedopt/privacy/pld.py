"""Google's dp-accounting privacy-loss-distribution accountant, registered as ``pld``."""

from __future__ import annotations

from typing import Any

from fedopt.privacy.accountants import (
    MAX_GRID_POINTS,
    Accountant,
    History,
    check_grid,
    register_accountant,
)

__all__ = ["PLDAccountant"]

#: dp-accounting's tail mass truncation of a self-composition (``DensePLDPmf.self_compose``).
_TAIL_MASS = 1e-15

#: Largest one-step grid built: constructing it takes ~200 bytes and ~10 µs per point.
_MAX_STEP_POINTS = MAX_GRID_POINTS // 4


def _step_points(sigma: float, step: float) -> float:
    """Points of one Gaussian step's PLD grid: its losses span about 20/σ + 1/σ².

    dp-accounting truncates the noise at a tail mass of e^-50 (about ±10σ), where
    the privacy loss (1 ∓ 2x) / (2σ²) ranges over 20/σ + 1/σ²; subsampling only
    narrows it, so this is the size for q = 1, an upper bound for every q.
    """
    return (20.0 / sigma + 1.0 / sigma**2) / step


def _composed_points(single: Any, steps: int) -> int:
    """Points of the FFT that composing ``single`` ``steps`` times allocates (0 if unknown).

    The bound is dp-accounting's own (``common.compute_self_convolve_bounds``, as
    ``DensePLDPmf.self_compose`` calls it); the Chernoff bounds are computed only
    when the untruncated size could exceed the limit.
    """
    from dp_accounting.pld import common
    from scipy import fft

    points = 0
    for pmf in (getattr(single, "_pmf_remove", None), getattr(single, "_pmf_add", None)):
        probs = getattr(pmf, "_probs", None)
        if probs is None or steps <= 1:
            continue  # a sparse PMF (a handful of points) or no composition at all
        size = (len(probs) - 1) * steps + 1
        if size > MAX_GRID_POINTS:
            low, high = common.compute_self_convolve_bounds(probs, steps, _TAIL_MASS)
            size = high - low + 1
        points = max(points, fft.next_fast_len(max(size, len(probs))))
    return points


class PLDAccountant(Accountant):
    """Privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), dp-accounting.

    Each history entry is composed as ``PoissonSampledDpEvent(q,
    GaussianDpEvent(σ))`` ``steps`` times under the add-or-remove-one relation
    (the same neighbouring relation as Opacus's accountants), with the
    library's pessimistic discretisation: the PLD of one step
    (``from_gaussian_mechanism(σ, sampling_prob=q)``), self-composed ``steps``
    times and composed onto the identity, exactly as dp-accounting's
    ``PLDAccountant`` does for that event. A composition whose FFT would exceed
    :data:`~fedopt.privacy.accountants.MAX_GRID_POINTS` points is refused
    before it is allocated.

    Parameters
    ----------
    value_discretization_interval : float
        dp-accounting's grid step of the privacy loss; smaller is tighter and slower.
    """

    monotone = True

    def __init__(self, *, value_discretization_interval: float = 1e-4) -> None:
        super().__init__()
        self.value_discretization_interval = value_discretization_interval

    def _epsilon(self, history: History, delta: float) -> float:
        import dp_accounting
        from dp_accounting.pld import privacy_loss_distribution as pld

        step = self.value_discretization_interval
        for sigma, q, n in history:
            check_grid("pld", _step_points(sigma, step), [(sigma, q, n)], limit=_MAX_STEP_POINTS)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        singles = [
            pld.from_gaussian_mechanism(
                standard_deviation=sigma,
                value_discretization_interval=step,
                sampling_prob=q,
                neighboring_relation=relation,
            )
            for sigma, q, _ in history
        ]
        points = sum(_composed_points(s, n) for s, (_, _, n) in zip(singles, history, strict=True))
        check_grid("pld", points, history)
        total = pld.identity(value_discretization_interval=step)
        for single, (_, _, n) in zip(singles, history, strict=True):
            total = total.compose(single.self_compose(int(n)))
        return float(total.get_epsilon_for_delta(delta))


register_accountant("pld", PLDAccountant)
