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


# -- ε never below 0, library failures as one PrivacyError, bounded grids ------------------


@pytest.mark.parametrize("name", accountant_names())
def test_a_huge_delta_gives_epsilon_zero_never_negative(name):
    # δ = 0.5: the formulas give ε < 0 ("nothing lost beyond δ"), reported as 0.0
    acc = make_accountant(name, history=HISTORIES[0])
    assert acc.get_epsilon(0.5) == 0.0
    assert str(acc.get_epsilon(0.5)) == "0.0"  # not -0.0


def test_the_libraries_own_epsilon_at_a_huge_delta_is_negative():
    assert opacus_eps(RDPAccountant, HISTORIES[0], delta=0.5) == pytest.approx(-0.60882, abs=1e-5)
    assert opacus_eps(PRVAccountant, HISTORIES[0], delta=0.5) == pytest.approx(-0.68170, abs=1e-5)
    with pytest.raises(ValueError, match="different signs"):  # Opacus's gdp has no root there
        opacus_eps(GaussianAccountant, HISTORIES[0], delta=0.5)


def test_gdp_edges_are_answered_or_named():
    big = make_accountant("gdp", history=[(0.5, 1.0, 10**6)])
    with pytest.raises(PrivacyError, match=r"beyond its range \(> 500\).*σ = 0.5, q = 1"):
        big.get_epsilon(1e-12)
    with pytest.raises(PrivacyError, match="μ overflows for σ = 0.01"):
        make_accountant("gdp", history=[(0.01, 1.0, 10)]).get_epsilon(DELTA)


@pytest.mark.parametrize("error", [ValueError, ZeroDivisionError, MemoryError])
def test_library_failures_and_nan_become_one_privacy_error(error):
    class Failing(Accountant):
        """Raises what a numerical library may raise."""

        def _epsilon(self, history, delta):
            raise error("no bracket")

    class NotANumber(Accountant):
        """Returns NaN."""

        def _epsilon(self, history, delta):
            return float("nan")

    register_accountant("test_failing", Failing)
    register_accountant("test_nan", NotANumber)
    try:
        with pytest.raises(PrivacyError) as err:
            make_accountant("test_failing", history=[(1.0, 0.1, 3)]).get_epsilon(DELTA)
        assert str(err.value) == (
            "the test_failing accountant failed for σ = 1, q = 0.1, 3 steps at δ = 1e-05: "
            f"{error.__name__}: no bracket"
        )
        with pytest.raises(PrivacyError, match=r"no ε \(NaN\) for σ = 1, q = 0.1, 3 steps"):
            make_accountant("test_nan", history=[(1.0, 0.1, 3)]).get_epsilon(DELTA)
    finally:
        ACCOUNTANTS.unregister("test_failing")
        ACCOUNTANTS.unregister("test_nan")


@pytest.mark.parametrize(
    ("name", "history", "points"),
    [
        ("prv", [(0.5, 1.0, 10**6)], "1.89e+12"),  # Opacus's domain, refused before discretising
        ("pld", [(0.01, 1.0, 10)], "1.2e+08"),  # one step's grid, refused before building it
        ("pld", [(2.0, 1.0, 10**7)], "2.51e+09"),  # the self-composition's FFT
    ],
)
def test_numerical_accountants_refuse_a_grid_too_large_to_allocate(name, history, points):
    with pytest.raises(PrivacyError) as err:
        make_accountant(name, history=history).get_epsilon(1e-12 if name == "prv" else DELTA)
    text = str(err.value)
    assert text.startswith(f"the {name} accountant would need a grid of {points} points")
    assert text.endswith(": use the rdp accountant for this plan")


# -- calibration: Opacus's search everywhere, reachability from one ε -----------------------


def test_gdp_and_prv_calibrate_as_opacus_does():
    from opacus.accountants.utils import get_noise_multiplier

    plan = {"sample_rate": 0.01, "steps": 500}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus = get_noise_multiplier(
            target_epsilon=3.0, target_delta=DELTA, accountant="gdp", **plan
        )
    assert calibrate_noise(target_epsilon=3.0, delta=DELTA, accountant="gdp", **plan) == opacus
    assert opacus == 0.64208984375
    # Opacus's get_noise_multiplier(3.0, 1e-5, q = 0.1, 40 steps, "prv") gives 1.27685546875
    sigma = calibrate_noise(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=40, accountant="prv"
    )
    assert sigma == 1.27685546875


def test_the_largest_sigma_the_search_accepts_is_opacus_s():
    from fedopt.privacy.calibration import LARGEST_SIGMA

    assert LARGEST_SIGMA == 655360.0  # 10 * 2**16: Opacus doubles from 10 up to 1e6
    h = [(LARGEST_SIGMA, 0.125, 240)]
    assert make_accountant("rdp", history=h).get_epsilon(DELTA) == opacus_eps(RDPAccountant, h)
    assert opacus_eps(RDPAccountant, h) == pytest.approx(0.1028673, abs=1e-7)


@pytest.mark.parametrize("name", ["rdp", "gdp", "pld"])
@pytest.mark.parametrize("q", [0.125, 0.25])
def test_check_reachable_agrees_with_the_search(name, q):
    from fedopt.privacy.calibration import check_reachable

    plan = {"delta": DELTA, "sample_rate": q, "steps": 30, "accountant": name}
    floor = epsilon_for(noise_multiplier=655360.0, **plan)
    high = max(2 * floor, 1.0)
    check_reachable(target_epsilon=high, **plan)  # reachable: no error, nothing searched
    assert calibrate_noise(target_epsilon=high, **plan) > 0
    if floor > 0:
        low = floor / 2
        with pytest.raises(PrivacyTargetError) as by_check:
            check_reachable(target_epsilon=low, where="client 3 (n_k = 8)", **plan)
        with pytest.raises(PrivacyTargetError) as by_search:
            calibrate_noise(target_epsilon=low, where="client 3 (n_k = 8)", **plan)
        assert str(by_check.value) == str(by_search.value)
        assert "client 3 (n_k = 8): q = " in str(by_check.value)
        assert "no σ up to 655360 reaches it" in str(by_check.value)


def test_reachability_at_q_one_half_is_decided_without_opacus_s_slow_series():
    from fedopt.privacy.calibration import check_reachable

    # Opacus's RDP at σ = 655360 and q = 0.5 takes seconds; the bounds at q = 1 and
    # q = 5e-7 decide both answers (this test takes milliseconds)
    plan = {"delta": DELTA, "sample_rate": 0.5, "steps": 30}
    check_reachable(target_epsilon=1.0, **plan)
    with pytest.raises(PrivacyTargetError, match=r"reaches it \(ε >= 0.1029 there\)$"):
        check_reachable(target_epsilon=0.05, **plan)
    with pytest.raises(PrivacyTargetError, match=r"reaches it \(ε >= 0.1029 there\)$"):
        calibrate_noise(target_epsilon=0.05, **plan)  # refused before searching, too


def test_malformed_calibration_requests_are_named():
    base = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": 0.1, "steps": 10}
    for bad, match in [
        ({"target_epsilon": float("nan")}, "ε must be a finite number > 0"),
        ({"sample_rate": 1.5}, r"q = 1.5 must be in \(0, 1\]"),
        ({"steps": 0}, "steps = 0 must be >= 1"),
        ({"delta": 1.0}, r"δ = 1.0 must be in \(0, 1\)"),
    ]:
        with pytest.raises(PrivacyTargetError, match=match):
            calibrate_noise(**{**base, **bad})


# -- fedopt privacy: a row per failure, exit 2, one line each, never a traceback -------------


def privacy(capsys, *argv):
    code = main(["privacy", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_huge_delta_every_accountant_reports_zero(capsys):
    code, out, err = privacy(capsys, "--sigma", "1", "--q", "0.01", "--steps", "500")
    assert code == 0
    code, out, err = privacy(
        capsys, "--sigma", "1", "--q", "0.01", "--steps", "500", "--delta", "0.5"
    )
    assert code == 0 and err == ""
    for name in accountant_names():
        assert any(line.split()[1:4] == [name, "│", "1.0000"] for line in out.splitlines())
    assert out.count("0.0000 │") == len(accountant_names())
    assert "ε = 0: at this δ the plan loses nothing beyond δ itself" in out


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--sigma", "-1"], "--sigma = -1.0 is not allowed: a finite noise multiplier σ > 0"),
        (["--sigma", "nan"], "--sigma = nan is not allowed: a finite noise multiplier σ > 0"),
        (["--target-epsilon", "0"], "--target-epsilon = 0.0 is not allowed: a finite target ε > 0"),
        (["--sigma", "1", "--target-epsilon", "1"], "exactly one of --sigma and --target-epsilon"),
        (["--sigma", "1", "--delta", "1"], "--delta = 1.0 is not allowed: a probability in (0, 1)"),
        (["--sigma", "1", "--accountant", "rdpp"], "(did you mean 'rdp'?)"),
    ],
)
def test_cli_bad_arguments_are_one_line_exit_2(capsys, argv, line):
    code, out, err = privacy(capsys, "--q", "0.01", "--steps", "50", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and line in err
    code, out, err = privacy(capsys, "--sigma", "1", "--q", "0", "--steps", "50")
    assert code == 2 and "--q = 0.0 is not allowed: a sampling rate in (0, 1]" in err


def test_cli_failed_rows_are_one_line_each_and_exit_2(capsys):
    code, out, err = privacy(capsys, "--sigma", "0.01", "--q", "1", "--steps", "10")
    assert code == 2 and err == ""
    failed = [line for line in out.splitlines() if " failed: " in line]
    assert [line.split()[0] for line in failed] == ["gdp", "pld", "prv"]
    assert all("σ = 0.01, q = 1, 10 steps" in line for line in failed)
    assert "55111.7783" in out  # rdp still answers (Opacus's RDP)


def test_cli_unreachable_target_is_a_row_each_and_exit_2(capsys):
    code, out, err = privacy(
        capsys, "--target-epsilon", "0.05", "--q", "0.01", "--steps", "100", "--accountant", "rdp"
    )
    assert code == 2 and err == ""
    [line] = [line for line in out.splitlines() if " failed: " in line]
    assert line == (
        "rdp failed: --target-epsilon = 0.05 is not allowed: a target reachable for q = 0.01, "
        "100 steps, δ = 1e-05 (rdp): no σ up to 655360 reaches it (ε >= 0.1029 there)"
    )
    code, out, err = privacy(
        capsys,
        *["--target-epsilon", "1e-9", "--q", "1", "--steps", "1000000", "--delta", "1e-12"],
        *["--accountant", "gdp", "--accountant", "rdp"],
    )
    assert code == 2
    assert [line.split(":")[0] for line in out.splitlines() if " failed: " in line] == [
        "gdp failed",
        "rdp failed",
    ]
    assert "(gdp): no σ up to 655360 reaches it (ε >= 4.34e-09 there)" in out
