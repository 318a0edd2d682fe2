"""Empirical privacy auditing of DP-SGD clients in one training run (``fedopt audit``).

Importing the package registers the ``[audit]`` scenario section
(:mod:`fedopt.audit.canaries`) and the server-side canary scorer
(:mod:`fedopt.audit.scoring`); :mod:`fedopt.audit.run` runs an audited
scenario and turns its scores into ε lower bounds with
:mod:`fedopt.privacy.audit`.
"""

from fedopt.audit.canaries import AuditParams, audited_clients, inclusion, make_canaries
from fedopt.audit.scoring import CanaryScorer

__all__ = ["AuditParams", "CanaryScorer", "audited_clients", "inclusion", "make_canaries"]
