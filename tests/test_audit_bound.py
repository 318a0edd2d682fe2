"""The one-run audit's bound (fedopt.privacy.audit) against independently computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedopt.privacy.audit import (
    audit_scores,
    epsilon_lower_bound,
    guess_counts,
    guesses_from_scores,
    max_lower_bound,
    p_value,
    split_threshold,
)


def test_pure_dp_p_value_is_the_binomial_tail():
    for r, v, eps in [(100, 70, 0.5), (1000, 990, 4.0), (10, 10, 2.0), (50, 20, 0.1)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        want = stats.binom.sf(v - 1, r, q)
        got = p_value(m=1000, guesses=r, correct=v, epsilon=eps, delta=0.0)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_delta_term_matches_its_definition():
    m, r, v, eps, delta = 500, 200, 150, 0.7, 1e-4
    q = math.exp(eps) / (1 + math.exp(eps))
    window = max(
        sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1)
    )
    want = stats.binom.sf(v - 1, r, q) + 2 * m * delta * window
    assert p_value(m=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(want)


def test_lower_bound_inverts_the_pure_dp_tail():
    # all of r = m = 1000 right, pure DP: q^r = β, so ε = logit(β^(1/r)) ≈ 5.81
    q = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(
        m=1000, guesses=1000, correct=1000, delta=0.0, beta=0.05
    ) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)
    eps = epsilon_lower_bound(m=400, guesses=100, correct=80, delta=0.0, beta=0.05)
    q = math.exp(eps) / (1 + math.exp(eps))
    assert stats.binom.sf(79, 100, q) == pytest.approx(0.05, rel=1e-3)


def test_lower_bound_is_monotone_and_zero_at_chance():
    m, r = 1000, 200
    bounds = [
        epsilon_lower_bound(m=m, guesses=r, correct=v, delta=1e-5) for v in range(100, 201, 10)
    ]
    assert bounds[0] == 0.0 and all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    tighter = [epsilon_lower_bound(m=m, guesses=r, correct=180, delta=d) for d in (0, 1e-5, 1e-4)]
    assert tighter[0] >= tighter[1] >= tighter[2] > 0
    loose = [epsilon_lower_bound(m=m, guesses=r, correct=180, beta=b, delta=0) for b in (0.01, 0.1)]
    assert loose[0] < loose[1]


def test_the_cap_and_what_it_takes_to_pass_8():
    """With m canaries the bound is capped; at δ = 1e-5 it cannot pass about 8.25 at any m.

    Guessing all m (a fixed r = m) and getting every guess right proves
    ε ≈ log(m / log(1/β)) for pure DP: 5.81 at m = 1000. The δ term grows with
    m (2 m δ), so at δ = 1e-5 the cap peaks near 8.24 (m ≈ 30000) and falls
    after; it first passes 8 at m = 13000. Trying the 7 guess counts of the
    default grid costs β / 7 per count and keeps the cap near 6.3 at any m.
    """
    cap = [epsilon_lower_bound(m=m, guesses=m, correct=m, delta=1e-5) for m in (12000, 13000)]
    assert cap[0] < 8 < cap[1]
    peak = max(
        epsilon_lower_bound(m=m, guesses=m, correct=m, delta=1e-5)
        for m in (20000, 30000, 50000, 100000)
    )
    assert 8.1 < peak < 8.3
    assert max(max_lower_bound(m=m, delta=1e-5) for m in (1000, 5000, 20000)) < 6.4
    assert max_lower_bound(m=1000, delta=1e-5, fractions=(1.0,)) == pytest.approx(5.78, abs=0.01)


def test_guesses_and_audit_scores():
    assert guess_counts(1000) == [10, 20, 50, 100, 200, 500, 1000]
    rng = np.random.default_rng(0)
    inc = rng.random(400) < 0.5
    scores = np.where(inc, 5.0, 0.0) + rng.normal(0, 0.3, 400)
    t = split_threshold(scores)
    assert 0.9 < t < 4.1
    g = guesses_from_scores(scores, guesses=400)
    assert np.all(g == np.where(inc, 1, -1))
    g = guesses_from_scores(scores, guesses=50)
    assert np.count_nonzero(g) == 50
    b = audit_scores(scores, inc, delta=1e-5)
    assert b.guesses == 400 and b.correct == 400 and b.epsilon == pytest.approx(b.cap)
    noise = audit_scores(rng.normal(size=400), inc, delta=1e-5)
    assert noise.epsilon < 0.5 and noise.level == pytest.approx(0.05 / 7)
