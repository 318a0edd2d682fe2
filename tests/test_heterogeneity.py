import json
import time

import numpy as np
import pytest

from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.heterogeneity import (
    ClockParams,
    ConstantParams,
    FxParams,
    LognormalParams,
    TwoTierParams,
    VirtualClock,
    availability,
    client_speeds,
    duration_model,
)
from fedopt.params import build
from fedopt.registry import SPEEDS, NoParams


def test_fx_exact_values():
    speeds = client_speeds("fx", FxParams(spread=80.0), num_clients=5, seed=0)
    np.testing.assert_allclose(1.0 / speeds, [1.0, 0.8, 0.6, 0.4, 0.2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(speeds, [1.0, 1.25, 5 / 3, 2.5, 5.0], rtol=1e-12)
    assert speeds.dtype == np.float64
    assert np.array_equal(speeds, client_speeds("fx", FxParams(), num_clients=5, seed=99))


def test_fx_homogeneous_and_single_client():
    assert np.array_equal(
        client_speeds("fx", FxParams(spread=0.0), num_clients=4, seed=0), [1.0] * 4
    )
    assert np.array_equal(client_speeds("fx", FxParams(), num_clients=1, seed=0), [1.0])


def test_constant():
    speeds = client_speeds("constant", NoParams(), num_clients=7, seed=3)
    assert speeds.dtype == np.float64 and np.array_equal(speeds, np.ones(7))


@pytest.mark.parametrize(
    ("fraction", "m", "slow"), [(0.5, 10, 5), (0.3, 10, 3), (0.0, 6, 0), (1.0, 6, 6)]
)
def test_two_tier_counts(fraction, m, slow):
    params = TwoTierParams(slow_fraction=fraction, slow_factor=0.25)
    speeds = client_speeds("two_tier", params, num_clients=m, seed=1)
    assert int((speeds == 0.25).sum()) == slow
    assert int((speeds == 1.0).sum()) == m - slow


def test_two_tier_slow_set_depends_on_seed():
    params = TwoTierParams(slow_fraction=0.5)
    a = client_speeds("two_tier", params, num_clients=40, seed=1)
    b = client_speeds("two_tier", params, num_clients=40, seed=1)
    c = client_speeds("two_tier", params, num_clients=40, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    rng = np.random.default_rng([1, 7919])
    expected = np.ones(40)
    expected[rng.permutation(40)[:20]] = 0.25
    assert np.array_equal(a, expected)


def test_lognormal_determinism_by_seed():
    params = LognormalParams(sigma=0.7)
    a = client_speeds("lognormal", params, num_clients=50, seed=11)
    b = client_speeds("lognormal", params, num_clients=50, seed=11)
    c = client_speeds("lognormal", params, num_clients=50, seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, np.random.default_rng([11, 7919]).lognormal(0.0, 0.7, 50))
    assert np.all(a > 0)
    zero = client_speeds("lognormal", LognormalParams(sigma=0.0), num_clients=5, seed=1)
    assert np.array_equal(zero, np.ones(5))


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (LognormalParams, "sigma", -0.1),
        (TwoTierParams, "slow_fraction", 1.5),
        (TwoTierParams, "slow_factor", 0.0),
        (TwoTierParams, "slow_factor", 1.2),
        (FxParams, "spread", 100.0),
        (FxParams, "spread", -1.0),
    ],
)
def test_bad_params_are_named(cls, field, value):
    with pytest.raises(ConfigError) as info:
        build(cls, {field: value}, "heterogeneity")
    assert info.value.key == f"heterogeneity.{field}"


def test_unknown_speed_model():
    with pytest.raises(ConfigError) as info:
        client_speeds("two-tier", NoParams(), num_clients=3, seed=0)
    assert info.value.key == "heterogeneity.speed"
    assert "did you mean 'two_tier'" in info.value.allowed
    assert {"constant", "fx", "lognormal", "two_tier"} <= set(SPEEDS.names())


def test_availability_deterministic_and_rate():
    a = availability(20000, probability=0.3, seed=5, round_=2)
    b = availability(20000, probability=0.3, seed=5, round_=2)
    c = availability(20000, probability=0.3, seed=5, round_=3)
    assert a.dtype == bool and a.shape == (20000,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(a.mean() - 0.3) < 0.015
    expected = np.random.default_rng([5, 2, 104729]).random(20000) < 0.3
    assert np.array_equal(a, expected)


def test_availability_extremes():
    assert availability(9, probability=1.0, seed=0, round_=1).all()
    assert not availability(9, probability=0.0, seed=0, round_=1).any()
    with pytest.raises(ValueError):
        availability(3, probability=1.5, seed=0, round_=1)


def test_clock_durations_and_rounds(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("the clock slept"))
    monkeypatch.setattr(time, "time", lambda: pytest.fail("the clock read wall time"))
    clock = VirtualClock(speeds=np.array([1.0, 2.0, 0.5]), base_rate=100.0)
    assert clock.duration(0, 200) == 2.0
    assert clock.duration(1, 200) == 1.0
    assert clock.duration(2, 200) == 4.0
    durations = {cid: clock.duration(cid, 200) for cid in (0, 1, 2)}
    assert clock.finish_round(durations) == 4.0
    assert clock.now == 4.0
    assert clock.finish_round({1: 0.5, 0: 1.5}) == 1.5
    assert clock.now == 5.5
    assert clock.finish_round({}) == 0.0
    assert clock.now == 5.5


def test_clock_with_fx_speeds():
    clock = VirtualClock(client_speeds("fx", FxParams(), num_clients=5, seed=0), base_rate=10.0)
    # per-unit time tau_i: 100 examples at 10 per second take 10 * tau_i seconds
    got = [clock.duration(i, 100) for i in range(5)]
    np.testing.assert_allclose(got, [10.0, 8.0, 6.0, 4.0, 2.0], rtol=1e-12)


def test_clock_state_round_trip():
    clock = VirtualClock(speeds=np.array([1.0, 1.25, 3.0]), base_rate=50.0)
    clock.finish_round({0: clock.duration(0, 75), 2: clock.duration(2, 300)})
    state = json.loads(json.dumps(clock.state_dict()))
    assert state == {
        "speeds": [1.0, 1.25, 3.0],
        "base_rate": 50.0,
        "now": 2.0,
        "duration_model": "work",
    }
    other = VirtualClock(speeds=np.ones(1))
    other.load_state_dict(state)
    assert other.now == 2.0 and other.base_rate == 50.0
    assert np.array_equal(other.speeds, clock.speeds) and other.speeds.dtype == np.float64
    assert other.duration(1, 125) == clock.duration(1, 125) == 2.0


def test_clock_rejects_bad_input():
    with pytest.raises(ValueError):
        VirtualClock(speeds=np.array([1.0, 0.0]))
    with pytest.raises(ValueError):
        VirtualClock(speeds=np.ones(2), base_rate=0.0)
    with pytest.raises(ValueError):
        VirtualClock(speeds=np.ones(2)).duration(0, -1)


def test_speed_duration_model_gives_the_fedfix_code_tau_exactly():
    # F-80 over M = 5: tau_i = 1 - i * 0.8 / 4, whatever each client's work.
    speeds = client_speeds("fx", FxParams(spread=80.0, duration="speed"), num_clients=5, seed=0)
    clock = VirtualClock(speeds, base_rate=160.0, duration_model="speed")
    got = [clock.duration(i, work) for i, work in enumerate([160, 100, 10, 0, 1e6])]
    np.testing.assert_allclose(got, [1.0, 0.8, 0.6, 0.4, 0.2], rtol=0, atol=1e-15)
    # The default work model: 100 examples at 160 per second take 0.625 * tau_i.
    work = VirtualClock(speeds, base_rate=160.0)
    np.testing.assert_allclose(
        [work.duration(i, 100) for i in range(5)], [0.625, 0.5, 0.375, 0.25, 0.125], atol=1e-15
    )


def test_speed_duration_model_makes_f0_homogeneous():
    speeds = client_speeds("fx", FxParams(spread=0.0), num_clients=4, seed=0)
    works = [160.0, 100.0, 120.0, 80.0]  # a Dirichlet split's unequal work
    speed = VirtualClock(speeds, base_rate=160.0, duration_model="speed")
    work = VirtualClock(speeds, base_rate=160.0)
    assert [speed.duration(i, w) for i, w in enumerate(works)] == [1.0] * 4
    assert [work.duration(i, w) for i, w in enumerate(works)] == [1.0, 0.625, 0.75, 0.5]


def test_duration_is_a_key_of_every_speed_model():
    assert [SPEEDS.get(n).params for n in ("constant", "lognormal", "two_tier", "fx")] == [
        ConstantParams,
        LognormalParams,
        TwoTierParams,
        FxParams,
    ]
    assert all(issubclass(SPEEDS.get(n).params, ClockParams) for n in SPEEDS.names())
    raw = {"name": "d", "heterogeneity": {"speed": "fx", "spread": 80.0, "duration": "speed"}}
    s = parse_scenario(raw)
    assert s.heterogeneity.params == FxParams(spread=80.0, duration="speed")
    assert duration_model(s.heterogeneity.params) == "speed"
    assert s.to_dict()["heterogeneity"]["duration"] == "speed"
    assert duration_model(parse_scenario({"name": "d"}).heterogeneity.params) == "work"
    assert duration_model(NoParams()) == "work"  # a user's speed model without the key
    with pytest.raises(ConfigError, match="duration"):
        parse_scenario({"name": "d", "heterogeneity": {"duration": "examples"}})


def test_clock_state_keeps_the_duration_model():
    clock = VirtualClock(speeds=np.array([2.0, 4.0]), duration_model="speed")
    state = clock.state_dict()
    assert state["duration_model"] == "speed"
    other = VirtualClock(speeds=np.ones(1))
    other.load_state_dict(state)
    assert other.duration(1, 999) == 0.25
    del state["duration_model"]  # a snapshot from before the key: the work model
    other.load_state_dict(state)
    assert other.duration(1, 400) == 1.0
    with pytest.raises(ValueError, match="duration_model"):
        VirtualClock(speeds=np.ones(2), duration_model="examples")


def test_synchronous_rounds_honour_the_speed_duration_model():
    from pathlib import Path

    from inline import run_inline

    from fedopt.config import read_toml

    root = Path(__file__).resolve().parents[1]
    raw = read_toml(root / "scenarios/quickstart.toml")
    raw["run"] = {"rounds": 2, "fed_eval_every": 0}
    raw["partition"]["num_clients"] = 5
    raw["heterogeneity"] = {"speed": "fx", "spread": 80.0, "duration": "speed"}
    rows, driver, _ = run_inline(parse_scenario(raw))
    # tau_i = 1 - 0.8 i / 4: the slowest client (i = 0) takes 1 s whatever its work
    assert [r["round_sim_time"] for r in rows[1:]] == [1.0, 1.0]
    assert driver.clock.duration_model == "speed"
    raw["heterogeneity"]["duration"] = "work"
    work, _, _ = run_inline(parse_scenario(raw))
    assert work[1]["round_sim_time"] != 1.0  # by work: examples / (base_rate x speed)
