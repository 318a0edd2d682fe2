"""The blow-up rule: a loss far above where the run started, for several rounds, stops the run.

Non-finite losses and aggregates stop a run where they appear (the drivers
check them). A run can also diverge without ever producing an inf: at
``lr = 1e6`` the loss settles near 4e5 and the model at chance. The rule here
reads only the metrics rows already written, so it needs no state of its own
and a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedopt.errors import DivergenceError

__all__ = ["LOSS_KEYS", "check_blowup"]

#: The loss the rule reads: the server's central test loss when the rows carry it
#: (its round-0 value is the initial model's), else the clients' training loss
#: (whose first value already averages a round of local steps).
LOSS_KEYS = ("central_loss", "train_loss")


def _losses(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r.get("round", i)), float(r[key])) for i, r in enumerate(rows) if key in r]


def check_blowup(rows: Sequence[Mapping[str, Any]], *, factor: float, rounds: int) -> None:
    """Raise when the last ``rounds`` losses all exceed ``factor`` x max(first loss, 1).

    The loss is the first key of :data:`LOSS_KEYS` the rows carry; the first
    finite value of it is the reference (the floor of 1 keeps a warm start
    with a tiny first loss from stopping a run that is merely fine-tuning).
    ``factor = 0`` turns the rule off.

    Raises
    ------
    DivergenceError
        Naming the round, the loss, its value and the threshold.
    """
    if factor <= 0.0:
        return
    for key in LOSS_KEYS:
        seen = _losses(rows, key)
        if seen:
            break
    else:
        return
    finite = [v for _, v in seen if math.isfinite(v)]
    if not finite or len(seen) < rounds:
        return
    limit = factor * max(finite[0], 1.0)
    tail = seen[-rounds:]
    if all(v > limit for _, v in tail):
        last_round, last = tail[-1]
        raise DivergenceError(
            last_round,
            key,
            detail=(
                f"{key} {last:.4g} above {limit:.4g} (run.diverge_factor = {factor:g} x "
                f"max(first {key} {finite[0]:.4g}, 1)) for {rounds} rounds in a row"
            ),
        )
