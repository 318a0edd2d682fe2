"""Differential privacy: pluggable accountants, noise calibration, DP-SGD plans, user-level DP.

Importing the package registers the built-in accountants (``rdp``, ``prv``,
``gdp`` from Opacus; ``pld`` from dp-accounting).
"""

from fedopt.privacy import opacus_accountants, pld  # noqa: F401  (register the accountants)
from fedopt.privacy.accountants import (
    ACCOUNTANTS,
    Accountant,
    PrivacyError,
    accountant_names,
    make_accountant,
    register_accountant,
)
from fedopt.privacy.calibration import PrivacyTargetError, calibrate_noise, epsilon_for

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "PrivacyError",
    "PrivacyTargetError",
    "accountant_names",
    "calibrate_noise",
    "epsilon_for",
    "make_accountant",
    "register_accountant",
]
