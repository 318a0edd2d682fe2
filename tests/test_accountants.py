"""Accountants against the libraries' own numbers, composition, state, calibration, the CLI."""

from __future__ import annotations

import warnings

import dp_accounting
import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from fedopt.cli import main
from fedopt.errors import ConfigError
from fedopt.privacy import (
    Accountant,
    PrivacyError,
    PrivacyTargetError,
    accountant_names,
    calibrate_noise,
    epsilon_for,
    make_accountant,
    register_accountant,
)
from fedopt.privacy.accountants import ACCOUNTANTS
from fedopt.privacy.cli import privacy_rows

DELTA = 1e-5
HISTORIES = [
    [(1.0, 0.01, 500)],
    [(1.5, 0.1, 30), (1.0, 0.1, 10)],
    [(2.0, 0.5, 20)],
]


def opacus_eps(cls, history, delta=DELTA):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = cls()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def pld_eps(history, delta=DELTA):
    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, n in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def test_registered_names_and_unknown_name_lists_them():
    assert {"rdp", "prv", "gdp", "pld"} <= set(accountant_names())
    with pytest.raises(ConfigError, match="gdp, pld, prv, rdp.*did you mean 'rdp'"):
        make_accountant("rdpp")


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "expected"),
    [(0.01, 1.0, 500, 1.6529), (0.01, 0.8, 500, 2.9790), (250 / 60000, 1.1, 3600, 1.2655)],
)
def test_rdp_pinned_values(q, sigma, steps, expected):
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    assert eps == pytest.approx(expected, abs=1e-4)


def test_gdp_pinned_value():
    eps = epsilon_for(
        noise_multiplier=1.0, sample_rate=0.01, steps=500, delta=DELTA, accountant="gdp"
    )
    assert eps == pytest.approx(1.1032, abs=1e-4)


@pytest.mark.parametrize("history", HISTORIES[:2])
def test_each_accountant_equals_its_library(history):
    assert make_accountant("rdp", history=history).get_epsilon(DELTA) == opacus_eps(
        RDPAccountant, history
    )
    assert make_accountant("prv", history=history).get_epsilon(DELTA) == pytest.approx(
        opacus_eps(PRVAccountant, history), rel=1e-9
    )
    assert make_accountant("pld", history=history).get_epsilon(DELTA) == pytest.approx(
        pld_eps(history), rel=1e-9
    )
    # dp-accounting's own RDP agrees with Opacus's (it drops a few non-converging orders)
    g = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, q, n in history:
        g.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    assert g.get_epsilon(DELTA) == pytest.approx(opacus_eps(RDPAccountant, history), rel=1e-3)


def test_gdp_equals_opacus_and_refuses_a_changing_history():
    h = HISTORIES[0]
    assert make_accountant("gdp", history=h).get_epsilon(DELTA) == opacus_eps(GaussianAccountant, h)
    with pytest.raises(PrivacyError, match="constant"):
        make_accountant("gdp", history=HISTORIES[1]).get_epsilon(DELTA)


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_and_pld_never_report_more_than_rdp(history):
    rdp = make_accountant("rdp", history=history).get_epsilon(DELTA)
    assert make_accountant("prv", history=history).get_epsilon(DELTA) <= rdp
    assert make_accountant("pld", history=history).get_epsilon(DELTA) <= rdp


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_composition_across_rounds_equals_one_run(name):
    tau = 40
    acc = make_accountant(name)
    for _ in (1, 3, 4):  # a client that joined rounds 1, 3 and 4
        state = acc.state_dict()
        acc = make_accountant(name)
        acc.load_state_dict(state)  # the state travels through Context.state between rounds
        acc.step(noise_multiplier=1.1, sample_rate=0.05, num_steps=tau)
    one = make_accountant(name)
    one.step(noise_multiplier=1.1, sample_rate=0.05, num_steps=3 * tau)
    assert acc.history == [(1.1, 0.05, 3 * tau)]
    assert acc.get_epsilon(DELTA) == one.get_epsilon(DELTA)


def test_state_dict_is_plain_and_checked():
    acc = make_accountant("rdp", history=HISTORIES[1])
    state = acc.state_dict()
    assert state == {"accountant": "rdp", "history": [[1.5, 0.1, 30], [1.0, 0.1, 10]]}
    with pytest.raises(PrivacyError, match="cannot load"):
        make_accountant("pld").load_state_dict(state)
    assert make_accountant("rdp").get_epsilon(DELTA) == 0.0
    with pytest.raises(PrivacyError, match="σ = 0"):
        acc.step(noise_multiplier=0.0, sample_rate=0.1)


def test_user_registered_accountant():
    class Doubling(Accountant):
        """Twice RDP's epsilon (a deliberately loose bound)."""

        def _epsilon(self, history, delta):
            return 2 * make_accountant("rdp", history=history).get_epsilon(delta)

    register_accountant("test_doubling", Doubling)
    try:
        eps = epsilon_for(
            noise_multiplier=1.0,
            sample_rate=0.01,
            steps=500,
            delta=DELTA,
            accountant="test_doubling",
        )
        assert eps == pytest.approx(2 * 1.6528760939928668)
        sigma = calibrate_noise(
            target_epsilon=6.0, delta=DELTA, sample_rate=0.01, steps=500, accountant="test_doubling"
        )
        assert sigma == pytest.approx(0.7983, abs=0.01)  # RDP's σ for ε = 3
    finally:
        ACCOUNTANTS.unregister("test_doubling")


@pytest.mark.parametrize(
    ("name", "target", "q", "steps", "tol"),
    [("rdp", 3.0, 0.01, 500, 0.01), ("rdp", 6.0, 0.01, 500, 0.01), ("pld", 3.0, 0.1, 40, 0.05)],
)
def test_calibration_hits_the_target_from_below(name, target, q, steps, tol):
    sigma = calibrate_noise(
        target_epsilon=target,
        delta=DELTA,
        sample_rate=q,
        steps=steps,
        accountant=name,
        tolerance=tol,
    )
    eps = epsilon_for(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=name
    )
    assert target - tol <= eps <= target
    if name == "rdp":
        assert sigma == pytest.approx({3.0: 0.7980, 6.0: 0.6297}[target], abs=2e-3)


def test_unreachable_target_is_a_named_error():
    with pytest.raises(PrivacyTargetError, match="target_epsilon = 1e-09.*reachable"):
        calibrate_noise(target_epsilon=1e-9, delta=1e-12, sample_rate=1.0, steps=10**6)


def test_privacy_rows_side_by_side():
    rows = privacy_rows(sample_rate=0.01, steps=500, delta=DELTA, noise_multiplier=1.0)
    by = {r["accountant"]: r["epsilon"] for r in rows}
    assert by["rdp"] == pytest.approx(1.6529, abs=1e-4) and by["gdp"] < by["pld"] < by["rdp"]
    with pytest.raises(ConfigError, match="exactly one"):
        privacy_rows(sample_rate=0.01, steps=500, delta=DELTA)


def test_cli_privacy_command(capsys):
    code = main(
        ["privacy", "--target-epsilon", "3", "--q", "0.01", "--steps", "500"]
        + ["--accountant", "rdp"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "0.798" in out and "rdp" in out
    assert (
        main(["privacy", "--sigma", "1", "--q", "0.01", "--steps", "5", "--accountant", "x"]) == 2
    )
