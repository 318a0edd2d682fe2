"""Server halves of fedopt's methods: Flower strategies registered by name.

Importing this package registers every built-in strategy in
:data:`fedopt.registry.STRATEGIES`.
"""

from strategies import flower  # noqa: F401  (registers the FedAvg family)
