"""Opacus's accountants (``rdp``, ``prv``, ``gdp``) behind fedopt's accountant interface.

Each ε is Opacus's own computation: the history is handed to a fresh Opacus
accountant (``accountant.history = [...]``, exactly how Opacus restores one)
and its ``get_epsilon`` answers. Calibration uses Opacus's
``get_noise_multiplier``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, ClassVar

import numpy as np

from fedopt.privacy.accountants import Accountant, History, PrivacyError, register_accountant

__all__ = ["GDPAccountant", "OpacusAccountant", "PRVAccountant", "RDPAccountant"]


class OpacusAccountant(Accountant):
    """An Opacus accountant (``opacus.accountants``), selected by its mechanism name."""

    #: ``opacus.accountants.create_accountant`` mechanism.
    mechanism: ClassVar[str] = ""

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


class PRVAccountant(OpacusAccountant):
    """Privacy random variables (Gopi et al. 2021), Opacus's ``PRVAccountant`` (upper bound)."""

    mechanism = "prv"


class GDPAccountant(OpacusAccountant):
    """Gaussian DP (Dong et al. 2019) CLT approximation, Opacus's ``GaussianAccountant``.

    Experimental in Opacus: it can underestimate ε, and it only handles a
    constant (σ, q) history.
    """

    mechanism = "gdp"

    def _epsilon(self, history: History, delta: float) -> float:
        if len(history) > 1:
            raise PrivacyError(
                "the gdp accountant needs one constant (σ, q) for the whole history; "
                f"this one has {len(history)} different entries (use rdp, prv or pld)"
            )
        return super()._epsilon(history, delta)


register_accountant("rdp", RDPAccountant)
register_accountant("prv", PRVAccountant)
register_accountant("gdp", GDPAccountant)
