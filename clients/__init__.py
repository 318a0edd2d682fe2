"""Client halves of fedopt's methods: local optimizers registered by name.

Importing this package registers every built-in local optimizer in
:data:`fedopt.registry.CLIENTS`.
"""

from clients import (  # noqa: F401  (each import registers its clients)
    decentralized,
    dpsgd,
    fedhyper,
    fedkseed,
    fedsvd,
    sgd,
)
