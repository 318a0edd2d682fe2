"""A Flower Strategy that forwards everything to an inner one: the base of strategy wrappers.

Wrappers registered in :data:`fedopt.registry.WRAPPERS` (privacy accounting,
curriculum client selection) change one or two steps of the strategy they
wrap and must leave the rest exactly as it was, including attributes other
code reads (``current_arrays``, a DP wrapper's ``clipping_norm``) and the
``summary_extra()`` facts of the strategies inside.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["WrappedStrategy"]


class WrappedStrategy(Strategy):
    """Forward every strategy step and unknown attribute to ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The strategy being wrapped (possibly itself a wrapper).
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def summary_extra(self) -> dict[str, Any]:
        """The wrapped strategy's summary facts (subclasses add their own)."""
        inner = getattr(self.strategy, "summary_extra", None)
        return dict(inner()) if callable(inner) else {}

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)
