"""The one-run audit's statistics: from guesses about m canaries to an ε lower bound.

Steinke, Nasr and Jagielski ("Privacy Auditing with One (1) Training Run",
NeurIPS 2023) insert m canaries, each independently with probability ½, train
once, and let an auditor guess "in" or "out" for r of them (abstaining on the
rest). If the training run is (ε, δ)-DP, the number W of correct guesses
satisfies, for every v,

    P[W ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2 m δ · max_{1 ≤ i ≤ v} P[v − i ≤ Binomial(r, q) < v] / i,

with q = e^ε / (1 + e^ε), the accuracy of ε-randomized response (the first
term alone is their pure-DP theorem; the second is their δ correction). An
observed v whose right-hand side is at most β rejects (ε, δ)-DP at confidence
1 − β; the empirical lower bound is the largest ε so rejected.

The bound is capped by m: r = m guesses, all right, reject at most the ε with
q^m ≈ β, i.e. ε ≈ log(m / log(1/β)) (about 5.8 for m = 1000, β = 0.05).
Choosing how many guesses to make after looking at the scores costs
confidence: :func:`audit_scores` tries a fixed grid of guess counts and
tests each at β / (grid size) (Bonferroni), so the maximum is a valid bound
at 1 − β. Everything here is pure numpy/scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GUESS_FRACTIONS",
    "AuditBound",
    "audit_scores",
    "epsilon_lower_bound",
    "guess_counts",
    "guesses_from_scores",
    "split_threshold",
    "max_lower_bound",
    "p_value",
]

#: Guess counts tried by :func:`audit_scores`, as fractions of m.
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")


def p_value(*, m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Largest probability that an (ε, δ)-DP run lets ``guesses`` guesses get ``correct`` right.

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability ½.
    guesses : int
        r, the guesses made (abstentions excluded).
    correct : int
        v, the correct ones.
    epsilon, delta : float
        The (ε, δ)-DP claim under test.

    Returns
    -------
    float
        The right-hand side of the bound, at most 1.
    """
    _check_counts(m, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    r, v = int(guesses), int(correct)
    if v == 0:
        return 1.0
    # Count wrong guesses instead (rate 1 - q = expit(-ε)): exact where q rounds to 1.
    from scipy import special, stats  # ~0.8 s to import: only when a bound is computed

    wrong = float(special.expit(-epsilon))
    cdf = stats.binom.cdf(np.arange(r - v, r + 1), r, wrong)  # P[wrong <= r - v + i], i = 0..v
    tail = float(cdf[0])  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(tail, 1.0)
    window = (cdf[1:] - cdf[0]) / np.arange(1, v + 1)  # P[v - i <= Binomial(r, q) < v] / i
    return min(tail + 2.0 * m * delta * float(window.max()), 1.0)


def epsilon_lower_bound(
    *, m: int, guesses: int, correct: int, delta: float, beta: float = 0.05, tol: float = 1e-6
) -> float:
    """The largest ε whose (ε, δ)-DP claim ``correct`` out of ``guesses`` rejects at 1 − β.

    0 when even ε = 0 is not rejected (the guesses are no better than chance).
    Found by bisection on ε; the p-value increases with ε.
    """
    if not 0 < beta < 1:
        raise ValueError(f"need 0 < beta < 1, got {beta}")

    def rejected(eps: float) -> bool:
        return p_value(m=m, guesses=guesses, correct=correct, epsilon=eps, delta=delta) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # v = r = m with δ = 0 and β -> 1 only
            return math.inf
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[int]:
    """The distinct guess counts ``max(1, round(f * m))`` of a grid of fractions, sorted."""
    return sorted({min(m, max(1, round(f * m))) for f in fractions if f > 0})


def max_lower_bound(
    *, m: int, delta: float, beta: float = 0.05, fractions: Sequence[float] = GUESS_FRACTIONS
) -> float:
    """The cap: what :func:`audit_scores` reports when every guess at every count is right."""
    counts = guess_counts(m, fractions)
    if not counts:
        return 0.0
    level = beta / len(counts)
    return max(
        epsilon_lower_bound(m=m, guesses=r, correct=r, delta=delta, beta=level) for r in counts
    )


def split_threshold(scores: np.ndarray, *, min_share: float = 0.05) -> float:
    """Where "in" scores end and "out" scores begin, estimated from the scores alone.

    Kittler and Illingworth's minimum-error threshold: the cut of the sorted
    scores that best fits two Gaussians of their own variances (the included
    canaries' scores spread more than the others'), each side holding at
    least ``min_share`` of them. No inclusion vector is used, so guesses need
    not assume that half of the canaries are in.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    low_n = max(2, math.ceil(min_share * n))
    if n < 2 * low_n or s[0] == s[-1]:
        return float(np.median(s)) if n else 0.0
    k = np.arange(low_n, n - low_n + 1)  # scores below the cut
    c1, c2 = np.cumsum(s), np.cumsum(s * s)
    mean_lo, mean_hi = c1[k - 1] / k, (c1[-1] - c1[k - 1]) / (n - k)
    var_lo = np.maximum(c2[k - 1] / k - mean_lo**2, 0.0)
    var_hi = np.maximum((c2[-1] - c2[k - 1]) / (n - k) - mean_hi**2, 0.0)
    tiny = 1e-12 * max(float(np.var(s)), 1e-300)
    p_lo, p_hi = k / n, 1.0 - k / n
    cost = p_lo * np.log(np.sqrt(var_lo + tiny) / p_lo) + p_hi * np.log(
        np.sqrt(var_hi + tiny) / p_hi
    )
    i = int(k[np.argmin(cost)])
    return float(0.5 * (s[i - 1] + s[i]))


def guesses_from_scores(scores: np.ndarray, *, guesses: int) -> np.ndarray:
    """+1 ("in") / −1 ("out") for the ``guesses`` scores farthest from the split, 0 elsewhere.

    Each guess is the side of :func:`split_threshold` its score lies on; the
    rest abstain. The guess count is fixed in advance and the signs depend on
    the scores only, as the bound requires. Ties are broken by position.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not 0 <= guesses <= len(s):
        raise ValueError(f"need 0 <= guesses <= {len(s)}, got {guesses}")
    t = split_threshold(s)
    order = np.argsort(-np.abs(s - t), kind="stable")[:guesses]
    out = np.zeros(len(s), dtype=np.int8)
    out[order] = np.where(s[order] > t, 1, -1)
    return out


@dataclass(frozen=True)
class AuditBound:
    """The best guess count of an audit and the ε lower bound it proves.

    Attributes
    ----------
    epsilon : float
        The ε lower bound at confidence 1 − β (already Bonferroni-corrected).
    guesses, correct : int
        r and v of the guess count that proves it.
    m : int
        Canaries.
    cap : float
        The bound had every guess been right (the most m canaries can show).
    level : float
        β / (number of guess counts tried): the level each count was tested at.
    """

    epsilon: float
    guesses: int
    correct: int
    m: int
    cap: float
    level: float


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = 0.05,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditBound:
    """Guess on the scores farthest from their split; the best bound over a grid of guess counts.

    Parameters
    ----------
    scores : array
        One score per canary (higher: more likely included), computed without ``included``.
    included : bool array
        Which canaries were inserted, revealed after scoring.
    delta, beta : float
        δ of the claim tested, and 1 − confidence.
    fractions : sequence of float
        Guess counts to try, as fractions of m; each is tested at β / len.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(f"need one score per canary, got {s.shape} and {inc.shape}")
    m = len(s)
    counts = guess_counts(m, fractions)
    level = beta / max(len(counts), 1)
    truth = np.where(inc, 1, -1)
    best = AuditBound(0.0, 0, 0, m, 0.0, level)
    cap = 0.0
    for r in counts:
        guess = guesses_from_scores(s, guesses=r)
        v = int(np.sum(guess == truth))
        eps = epsilon_lower_bound(m=m, guesses=r, correct=v, delta=delta, beta=level)
        cap = max(cap, epsilon_lower_bound(m=m, guesses=r, correct=r, delta=delta, beta=level))
        if eps > best.epsilon or best.guesses == 0:
            best = AuditBound(eps, r, v, m, 0.0, level)
    return AuditBound(best.epsilon, best.guesses, best.correct, m, cap, level)
