"""Hypergradient learning-rate updates of FedHyper (pure math on flattened updates).

FedHyper (Wang, Wang & Li, ICLR 2024) adapts learning rates with the
hypergradient ∂f(θ_t)/∂α_{t−1} ≈ −⟨Δ_t, Δ_{t−1}⟩: a rate grows while
consecutive updates point the same way and shrinks when they oppose. The
functions here are the update rules of the released code (``ATP-1010/FedHyper``,
``src/federated_main.py`` and ``src/update.py``), written once so that the
server strategy and the client optimizer compute them identically. They take
flattened updates (numpy arrays or torch tensors) or their dot products and
hold no state: the caller keeps θ, Δ, the momentum and the rates.

Message keys shared by both halves live here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "CLIENTS_KEY",
    "CLIENT_VARIANTS",
    "GAMMA_MAX_KEY",
    "HIGH_KEY",
    "LOW_KEY",
    "PREV_UPDATE_KEY",
    "VARIANTS",
    "X_SCALE_KEY",
    "Variant",
    "accumulate",
    "client_rate_factor",
    "clip",
    "dot",
    "global_step",
    "server_local_rate",
]

#: RecordDict key of the previous global update Δ_{t−1} sent to client-side (CL) clients.
PREV_UPDATE_KEY = "hyper-prev-update"
#: Round-config keys of the client-side rule: clients per round, x scale, γ cap, β bounds.
CLIENTS_KEY = "hyper-clients"
X_SCALE_KEY = "hyper-x-scale"
GAMMA_MAX_KEY = "hyper-gamma-max"
LOW_KEY = "hyper-factor-min"
HIGH_KEY = "hyper-factor-max"


@dataclass(frozen=True)
class Variant:
    """What one FedHyper variant adapts, with the released code's defaults.

    Attributes
    ----------
    global_rate : bool
        Scale the averaged update by the global rate 1 + a (G, GM, FULL).
    momentum : float
        Server momentum on the global update (0 for G: then GM's rule is G's).
    global_bounds : tuple of float or None
        Bounds of the global rate 1 + a; None leaves a unclipped (SL).
    server_local : bool
        Send the server-side local rate η0·(1 + a) to the clients (SL).
    client_local : bool
        Clients adapt their own per-step rate (CL, FULL).
    """

    global_rate: bool
    momentum: float = 0.0
    global_bounds: tuple[float, float] | None = None
    server_local: bool = False
    client_local: bool = False


#: The variants by name. Global-rate bounds are the released code's: a ∈ [−0.8, 4] for G,
#: [−0.2, 4] for GM and FULL, i.e. a global rate 1 + a in [0.2, 5] and [0.8, 5].
VARIANTS = MappingProxyType(
    {
        "G": Variant(global_rate=True, global_bounds=(0.2, 5.0)),
        "GM": Variant(global_rate=True, momentum=0.9, global_bounds=(0.8, 5.0)),
        "SL": Variant(global_rate=False, server_local=True),
        "CL": Variant(global_rate=False, client_local=True),
        "FULL": Variant(
            global_rate=True, momentum=0.9, global_bounds=(0.8, 5.0), client_local=True
        ),
    }
)
#: Variants whose clients run the per-step rule (they need the ``fedhyper`` client).
CLIENT_VARIANTS = frozenset(name for name, v in VARIANTS.items() if v.client_local)


def dot(a: Any, b: Any) -> float:
    """⟨a, b⟩ of two flattened updates (numpy arrays or torch tensors) as a Python float."""
    return float((a * b).sum())


def clip(value: float, low: float | None, high: float | None) -> float:
    """``value`` clipped to [low, high]; a None bound is open."""
    if low is not None:
        value = max(low, value)
    if high is not None:
        value = min(high, value)
    return value


def accumulate(
    a: float,
    hypergradient: float,
    *,
    rate: float = 1.0,
    bounds: tuple[float, float] | None = None,
) -> float:
    """The running sum a ← a + rate·⟨Δ_{t−1}, Δ_t⟩ with the global rate 1 + a kept in ``bounds``.

    As in the released code (where ``rate`` is 1), a sums raw (unnormalised)
    dot products, so it is scale dependent: for large models it reaches a
    bound within a few rounds, for small ones (or small updates) it barely moves.

    Parameters
    ----------
    a : float
        The current sum (0 before the second round).
    hypergradient : float
        ⟨previous update (or momentum), current update⟩.
    rate : float
        The hyper learning rate that scales the dot product (1 in the released code).
    bounds : tuple of float or None
        (lowest, highest) global rate 1 + a; None for no clipping (SL).
    """
    a = a + rate * hypergradient
    if bounds is None:
        return a
    return clip(a, bounds[0] - 1.0, bounds[1] - 1.0)


def global_step(theta_bar: Any, delta: Any, momentum: Any, *, a: float, beta: float) -> tuple:
    """FedHyper-G/GM's global step; returns (θ_{t+1}, m_t).

    θ_{t+1} = θ̄_t + a·Δ_t + β·a·m_{t−1} = θ_t + (1 + a)·Δ_t + β·a·m_{t−1} and
    m_t = Δ_t + β·m_{t−1}. With β = 0 (or no momentum yet, ``momentum=None``)
    this is FedHyper-G: θ_t + (1 + a)·Δ_t, m_t = Δ_t.

    Parameters
    ----------
    theta_bar : array
        The data-size weighted average of the client models, θ̄_t.
    delta : array
        Δ_t = θ̄_t − θ_t, unscaled.
    momentum : array or None
        m_{t−1}; None in the first round.
    a : float
        The global rate minus one.
    beta : float
        The momentum coefficient (0.9 in the released code).
    """
    if momentum is None or beta == 0.0:
        return theta_bar + a * delta, delta
    return theta_bar + a * delta + (beta * a) * momentum, delta + beta * momentum


def server_local_rate(a: float, *, lr0: float, low: float, high: float) -> float:
    """FedHyper-SL's local rate clip(η0·(1 + a), low, high) (0.001 and 0.1 in the released code)."""
    return clip(lr0 * (1.0 + a), low, high)


def client_rate_factor(
    factor: float,
    *,
    dot_global: float,
    dot_prev: float,
    clients: float,
    x_scale: float = 0.1,
    gamma_max: float = 1.1,
    low: float = 0.1,
    high: float = 10.0,
) -> float:
    """FedHyper-CL's per-step rate factor β_k (the local rate is η0·β_k).

    x = x_scale·⟨g_k, Δ_{t−1}⟩ / clients, y = ⟨g_k, g_{k−1}⟩,
    γ = min(gamma_max, 1 + x + y), β_k = clip(γ·β_{k−1}, low, high), where g_k
    is the change of the parameters in local step k and ``clients`` the number
    of clients per round (N·frac in the released code).

    Parameters
    ----------
    factor : float
        β_{k−1} (1 at the start of every round).
    dot_global : float
        ⟨g_k, Δ_{t−1}⟩, the step against the previous global update.
    dot_prev : float
        ⟨g_k, g_{k−1}⟩, the step against the previous step (Δ_{t−1} before the first).
    clients : float
        Clients per round, > 0.
    x_scale : float
        Weight of the alignment with the previous global update (0.1).
    gamma_max : float
        Cap of the per-step growth γ (1.1).
    low, high : float
        Bounds of β (0.1 and 10: the rate stays within [η0/10, 10·η0]).
    """
    if not clients > 0 or not math.isfinite(clients):
        raise ValueError(f"clients per round must be a finite number > 0, got {clients}")
    x = x_scale * dot_global / clients
    gamma = min(gamma_max, 1.0 + x + dot_prev)
    return clip(gamma * factor, low, high)
