"""fedopt: a simulator for federated and private learning on Flower and Ray.

The Python API: :func:`run` a scenario (a :class:`Scenario` or a TOML path)
and get a :class:`RunResult`; :func:`load_scenario` and
:func:`parse_scenario` validate scenario files and mappings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunResult", "Scenario", "load_scenario", "parse_scenario", "run"]

if TYPE_CHECKING:
    from fedopt.config import Scenario, load_scenario, parse_scenario
    from fedopt.simulation import RunResult, run


def __getattr__(name: str) -> Any:
    """Import the public API lazily so that ``import fedopt`` stays cheap."""
    if name in ("Scenario", "load_scenario", "parse_scenario"):
        from fedopt import config

        return getattr(config, name)
    if name in ("RunResult", "run"):
        from fedopt import simulation

        return getattr(simulation, name)
    raise AttributeError(f"module 'fedopt' has no attribute {name!r}")
