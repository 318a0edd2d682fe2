"""Opacus's accountants (``rdp``, ``prv``, ``gdp``) behind fedopt's accountant interface.

Each ε is Opacus's own computation: the history is handed to a fresh Opacus
accountant (``accountant.history = [...]``, exactly how Opacus restores one)
and its ``get_epsilon`` answers. Around it: ``prv`` refuses a discretisation
domain over :data:`~fedopt.privacy.accountants.MAX_GRID_POINTS` before
allocating it, and ``gdp`` answers the cases where Opacus's root search has no
bracket (ε ≤ 0 at a large δ is 0; ε > 500 is an error). ``rdp`` calibrates
with Opacus's ``get_noise_multiplier``; ``prv`` and ``gdp`` with the same
search in :mod:`fedopt.privacy.calibration`, run on these guarded ε.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, ClassVar

import numpy as np

from fedopt.privacy.accountants import (
    Accountant,
    History,
    PrivacyError,
    check_grid,
    describe,
    register_accountant,
)

__all__ = ["GDPAccountant", "OpacusAccountant", "PRVAccountant", "RDPAccountant"]


class OpacusAccountant(Accountant):
    """An Opacus accountant (``opacus.accountants``), selected by its mechanism name."""

    #: ``opacus.accountants.create_accountant`` mechanism.
    mechanism: ClassVar[str] = ""
    monotone = True
    #: Calibrate with Opacus's ``get_noise_multiplier`` (which runs Opacus's unguarded
    #: accountant); when false, :func:`~fedopt.privacy.calibration.calibrate_noise` runs
    #: the same search on this class's ε.
    opacus_calibration: ClassVar[bool] = True

    def _opacus(self, history: History) -> Any:
        from opacus.accountants import create_accountant

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = create_accountant(mechanism=self.mechanism)
        acc.history = [tuple(h) for h in history]
        return acc

    def _epsilon(self, history: History, delta: float) -> float:
        return float(self._opacus(history).get_epsilon(delta=delta))

    def calibrate(
        self,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        steps: int,
        tolerance: float,
    ) -> float | None:
        from opacus.accountants.utils import get_noise_multiplier

        if not self.opacus_calibration:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return float(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=int(steps),
                        accountant=self.mechanism,
                        epsilon_tolerance=tolerance,
                    )
                )
            except ValueError as err:
                raise PrivacyError(str(err)) from err


@functools.lru_cache(maxsize=4096)
def _unit_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """Opacus's RDP of one subsampled Gaussian step at its default orders (a pure memo)."""
    from opacus.accountants import RDPAccountant as Opacus
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=Opacus.DEFAULT_ALPHAS
    )
    return tuple(float(v) for v in rdp)


class RDPAccountant(OpacusAccountant):
    """Rényi DP (Mironov 2017) of the subsampled Gaussian, Opacus's ``RDPAccountant``.

    Converted to (ε, δ) with Balle et al. 2020 over Opacus's default orders.
    The computation is Opacus's own (``analysis.rdp.compute_rdp`` and
    ``get_privacy_spent``, as ``RDPAccountant.get_epsilon`` calls them); the
    one-step RDP curve of each (σ, q) is memoised, since RDP is linear in the
    number of steps and a client's history repeats the same (σ, q) every round.
    """

    mechanism = "rdp"

    def _epsilon(self, history: History, delta: float) -> float:
        from opacus.accountants import RDPAccountant as Opacus
        from opacus.accountants.analysis import rdp as analysis

        rdp = sum(np.asarray(_unit_rdp(q, sigma)) * n for sigma, q, n in history)
        eps, _ = analysis.get_privacy_spent(orders=Opacus.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)


@functools.cache
def _guarded_prv() -> type:
    """Opacus's PRVAccountant, checking its domain's size before discretising on it."""
    from opacus.accountants import PRVAccountant as Opacus

    class Guarded(Opacus):
        def _get_domain(self, **kwargs: Any) -> Any:
            domain = super()._get_domain(**kwargs)
            check_grid("prv", domain.size, [tuple(h) for h in self.history])
            return domain

    return Guarded


class PRVAccountant(OpacusAccountant):
    """Privacy random variables (Gopi et al. 2021), Opacus's ``PRVAccountant`` (upper bound).

    The domain Opacus picks grows with the steps and δ; one over
    :data:`~fedopt.privacy.accountants.MAX_GRID_POINTS` points is refused
    (a :class:`PrivacyError`) before any array is allocated.
    """

    mechanism = "prv"
    monotone = False
    opacus_calibration = False

    def _opacus(self, history: History) -> Any:
        acc = _guarded_prv()()
        acc.history = [tuple(h) for h in history]
        return acc


class GDPAccountant(OpacusAccountant):
    """Gaussian DP (Dong et al. 2019) CLT approximation, Opacus's ``GaussianAccountant``.

    Experimental in Opacus: it can underestimate ε, and it only handles a
    constant (σ, q) history.
    """

    mechanism = "gdp"
    opacus_calibration = False

    def _epsilon(self, history: History, delta: float) -> float:
        """Opacus's ε, or 0 when δ alone covers the loss; ε > 500 is refused.

        Opacus solves δ(ε; μ) = δ for ε in [0, 500] (μ-GDP's dual). Where δ(0; μ)
        is already at most δ there is no root and the answer is ε = 0; where
        δ(500; μ) is still above δ the answer is beyond the range.
        """
        from opacus.accountants.analysis import gdp

        if len(history) > 1:
            raise PrivacyError(
                "the gdp accountant needs one constant (σ, q) for the whole history; "
                f"this one has {len(history)} different entries (use rdp, prv or pld)"
            )
        sigma, q, n = history[0]
        with np.errstate(all="ignore"):
            mu = float(gdp.compute_mu_poisson(steps=n, noise_multiplier=sigma, sample_rate=q))
            if not math.isfinite(mu):
                raise PrivacyError(
                    f"the gdp accountant's μ overflows for {describe(history)}: σ is too "
                    "small for its CLT approximation (use rdp, prv or pld)"
                )
            if mu == 0.0 or gdp.delta_eps_mu(eps=0.0, mu=mu) <= delta:
                return 0.0
            if gdp.delta_eps_mu(eps=500.0, mu=mu) > delta:
                raise PrivacyError(
                    f"the gdp accountant's ε is beyond its range (> 500) for "
                    f"{describe(history)} at δ = {delta:g}"
                )
        return super()._epsilon(history, delta)


register_accountant("rdp", RDPAccountant)
register_accountant("prv", PRVAccountant)
register_accountant("gdp", GDPAccountant)
