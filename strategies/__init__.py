"""Server halves of fedopt's methods: Flower strategies registered by name.

Importing this package registers every built-in strategy in
:data:`fedopt.registry.STRATEGIES` (and the privacy wrappers, sections and client mods of
``strategies.dp``).
"""

from strategies import (  # noqa: F401  (each import registers its strategies)
    curriculum,
    decentralized,
    dp,
    fedfix,
    fedhyper,
    fedkseed,
    fedsvd,
    flower,
)
