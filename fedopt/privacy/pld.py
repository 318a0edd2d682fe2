"""Google's dp-accounting privacy-loss-distribution accountant, registered as ``pld``."""

from __future__ import annotations

from fedopt.privacy.accountants import Accountant, History, register_accountant

__all__ = ["PLDAccountant"]


class PLDAccountant(Accountant):
    """Privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), dp-accounting.

    Each history entry is composed as ``PoissonSampledDpEvent(q,
    GaussianDpEvent(σ))`` ``steps`` times under the add-or-remove-one relation
    (the same neighbouring relation as Opacus's accountants), with the
    library's pessimistic discretisation.

    Parameters
    ----------
    value_discretization_interval : float
        dp-accounting's grid step of the privacy loss; smaller is tighter and slower.
    """

    def __init__(self, *, value_discretization_interval: float = 1e-4) -> None:
        super().__init__()
        self.value_discretization_interval = value_discretization_interval

    def _epsilon(self, history: History, delta: float) -> float:
        import dp_accounting

        acc = dp_accounting.pld.PLDAccountant(
            value_discretization_interval=self.value_discretization_interval
        )
        for sigma, q, n in history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, int(n))
        return float(acc.get_epsilon(delta))


register_accountant("pld", PLDAccountant)
