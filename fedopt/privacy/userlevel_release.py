"""What a Poisson-sampled user-level round releases: client draws, the fixed-denominator sum.

Pure numpy, shared by the server's privacy wrapper and the tests that check it.
Under ``[user_dp] sampling = "poisson"`` each available client joins a round
independently with probability q, and the round releases

    new = current + (Σ_i clip_C(update_i) + N(0, (z·C)² I)) / (q·N)

with the fixed denominator q·N (the expected number of clients), never the
number of replies: one client more or less moves the released vector by at
most C / (q·N), so the round is exactly a Poisson-subsampled Gaussian with
multiplier z under add/remove-one-client adjacency. A round that selects no
one releases ``current + noise / (q·N)``. Adaptive clipping (Andrew et al.
2021) releases, from the same generator, the centred count of unclipped
updates Σ_i (u_i − 1/2) + N(0, σ_b²) (sensitivity 1/2) and moves C by
``C · exp(−η · (b̄ − γ))``, b̄ the noised unclipped fraction over q·N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["adapted_clip", "clip_update", "fixed_select", "noised_sum_release", "poisson_select"]


def poisson_select(
    available: Sequence[int], *, num_clients: int, sample_rate: float, seed: int
) -> list[int]:
    """The available clients that join: client c iff ``u[c] < q``, u uniform on [0, 1)^N.

    One draw per client of the whole population, indexed by client id, so a
    client's inclusion does not depend on who else is available.
    """
    u = np.random.default_rng(seed).random(num_clients)
    return sorted(int(c) for c in available if u[int(c)] < sample_rate)


def fixed_select(available: Sequence[int], *, size: int, seed: int) -> list[int]:
    """``min(size, len(available))`` distinct available clients, uniformly at random."""
    pool = np.array(sorted(int(c) for c in available), dtype=np.int64)
    k = min(int(size), len(pool))
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False)) if k else []


def clip_update(update: Sequence[np.ndarray], *, clip: float) -> tuple[list[np.ndarray], bool]:
    """``update`` scaled to L2 norm at most ``clip`` (float64), and whether it was scaled down."""
    arrays = [np.asarray(a, dtype=np.float64) for a in update]
    norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in arrays))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [a * scale for a in arrays], scale < 1.0


def noised_sum_release(
    current: Sequence[np.ndarray],
    replies: Sequence[Sequence[np.ndarray]],
    *,
    clip: float,
    noise_std: float,
    denominator: float,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[bool]]:
    """``current + (Σ clipped (reply − current) + noise) / denominator``, and each reply's clip bit.

    The clipped updates are summed in float64 in the order given; the noise is
    ``rng.normal(0, noise_std, shape)`` for each array in order; the result
    has each array's dtype of ``current``.
    """
    base = [np.asarray(c, dtype=np.float64) for c in current]
    total = [np.zeros_like(b) for b in base]
    bits = []
    for reply in replies:
        update = [np.asarray(r, dtype=np.float64) - b for r, b in zip(reply, base, strict=True)]
        clipped, bit = clip_update(update, clip=clip)
        bits.append(bit)
        for t, c in zip(total, clipped, strict=True):
            t += c
    noise = [rng.normal(0.0, noise_std, size=b.shape) for b in base]
    new = [
        (b + (t + n) / denominator).astype(np.asarray(c).dtype, copy=False)
        for b, t, n, c in zip(base, total, noise, current, strict=True)
    ]
    return new, bits


def adapted_clip(
    clip: float,
    *,
    unclipped: int,
    replies: int,
    count_stddev: float,
    denominator: float,
    target_quantile: float,
    lr: float,
    rng: np.random.Generator,
) -> float:
    """The next clipping norm from the noised, centred count of unclipped updates.

    ``b̄ = (unclipped − replies / 2 + N(0, σ_b²)) / denominator + 1/2`` and
    ``C ← C · exp(−lr · (b̄ − γ))``: C moves towards the γ-quantile of the
    update norms (fewer than γ unclipped: C grows).
    """
    noisy = unclipped - replies / 2 + float(rng.normal(0.0, count_stddev))
    fraction = noisy / denominator + 0.5
    return float(clip * math.exp(-lr * (fraction - target_quantile)))
