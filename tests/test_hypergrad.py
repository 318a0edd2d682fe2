"""FedHyper's update rules on hand-made update sequences (fedopt.hypergrad)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedopt import hypergrad as hg


def run_global(deltas, *, bounds, rate=1.0):
    """The global rate 1 + a after each update of a sequence, as the strategy applies it."""
    a, prev, out = 0.0, None, []
    for d in deltas:
        d = np.asarray(d, dtype=np.float64)
        if prev is not None:
            a = hg.accumulate(a, hg.dot(prev, d), rate=rate, bounds=bounds)
        prev = d
        out.append(1.0 + a)
    return out


def test_rate_rises_while_updates_align():
    rates = run_global([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], bounds=(0.2, 5.0))
    assert rates == [1.0, 2.0, 2.5]  # 0 + 1, then + 0.5


def test_rate_falls_when_updates_oppose():
    rates = run_global([[1.0, 0.0], [0.5, 0.0], [-0.5, 0.0]], bounds=(0.2, 5.0))
    assert rates == pytest.approx([1.0, 1.5, 1.25])


def test_rate_respects_the_variant_bounds():
    up = run_global([[2.0, 0.0]] * 3, bounds=hg.VARIANTS["G"].global_bounds)
    assert up == [1.0, 5.0, 5.0]  # a = 4 would be 8 and 12: clipped to 4
    down = run_global([[2.0, 0.0], [-2.0, 0.0]], bounds=hg.VARIANTS["G"].global_bounds)
    assert down == pytest.approx([1.0, 0.2])  # a = -4 clipped to -0.8
    down_gm = run_global([[2.0, 0.0], [-2.0, 0.0]], bounds=hg.VARIANTS["GM"].global_bounds)
    assert down_gm == pytest.approx([1.0, 0.8])  # a = -4 clipped to -0.2
    free = run_global([[2.0, 0.0], [-2.0, 0.0], [-2.0, 0.0]], bounds=None)
    assert free == [1.0, -3.0, 1.0]  # SL: unclipped running sum


def test_hyper_lr_scales_the_dot_product():
    rates = run_global([[0.1, 0.0], [0.1, 0.0]], bounds=(0.2, 5.0), rate=50.0)
    assert rates == pytest.approx([1.0, 1.5])  # 50 * 0.01


def test_global_step_g_is_theta_plus_scaled_update():
    theta = np.array([1.0, -1.0])
    delta = np.array([0.5, 0.25])
    new, m = hg.global_step(theta + delta, delta, None, a=1.5, beta=0.9)
    np.testing.assert_allclose(new, theta + 2.5 * delta)
    assert m is delta


def test_global_step_gm_adds_scaled_momentum():
    theta_bar, delta, m = np.array([1.0, 1.0]), np.array([0.5, 0.0]), np.array([1.0, 2.0])
    new, m_next = hg.global_step(theta_bar, delta, m, a=0.5, beta=0.9)
    np.testing.assert_allclose(new, [1.0 + 0.25 + 0.45, 1.0 + 0.0 + 0.9])
    np.testing.assert_allclose(m_next, [0.5 + 0.9, 1.8])


def test_server_local_rate_is_clipped():
    assert hg.server_local_rate(2.0, lr0=0.01, low=0.001, high=0.1) == pytest.approx(0.03)
    assert hg.server_local_rate(20.0, lr0=0.01, low=0.001, high=0.1) == 0.1
    assert hg.server_local_rate(-5.0, lr0=0.01, low=0.001, high=0.1) == 0.001


def test_client_factor_grows_at_most_gamma_max_per_step():
    # x = 0.1 * 10 / 10 = 0.1, y = 0.05: gamma = min(1.1, 1.15) = 1.1
    assert hg.client_rate_factor(1.0, dot_global=10.0, dot_prev=0.05, clients=10) == 1.1
    # x = 0.1 * 2 / 10 = 0.02, y = 0.03: gamma = 1.05
    f = hg.client_rate_factor(2.0, dot_global=2.0, dot_prev=0.03, clients=10)
    assert f == pytest.approx(2.1)


def test_client_factor_falls_when_steps_oppose():
    # x = 0.1 * (-20) / 10 = -0.2, y = -0.1: gamma = 0.7
    f = hg.client_rate_factor(2.0, dot_global=-20.0, dot_prev=-0.1, clients=10)
    assert f == pytest.approx(1.4)


def test_client_factor_respects_its_bounds():
    assert hg.client_rate_factor(9.5, dot_global=0.0, dot_prev=1.0, clients=1) == 10.0
    assert hg.client_rate_factor(0.12, dot_global=0.0, dot_prev=-0.5, clients=1) == 0.1
    # 1 + x + y < 0 makes gamma negative: the factor stops at the lower bound
    assert hg.client_rate_factor(1.0, dot_global=0.0, dot_prev=-3.0, clients=1) == 0.1
    kw = {"low": 0.5, "high": 2.0, "gamma_max": 1.5}
    assert hg.client_rate_factor(1.9, dot_global=0.0, dot_prev=5.0, clients=1, **kw) == 2.0
    with pytest.raises(ValueError, match="clients per round"):
        hg.client_rate_factor(1.0, dot_global=1.0, dot_prev=0.0, clients=0)


def test_dot_takes_numpy_and_torch():
    assert hg.dot(np.array([1.0, 2.0]), np.array([3.0, -1.0])) == 1.0
    assert hg.dot(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])) == 1.0


def test_variants_table():
    assert hg.VARIANTS["G"].global_bounds == (0.2, 5.0) and hg.VARIANTS["G"].momentum == 0.0
    assert hg.VARIANTS["GM"].global_bounds == (0.8, 5.0) and hg.VARIANTS["GM"].momentum == 0.9
    assert hg.VARIANTS["SL"].global_bounds is None and hg.VARIANTS["SL"].server_local
    assert hg.CLIENT_VARIANTS == {"CL", "FULL"}
    assert hg.VARIANTS["FULL"].global_rate and not hg.VARIANTS["CL"].global_rate
