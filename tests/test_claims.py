"""Sweep claims ([[expect]]), rate grids ([tune]) and the quick tier ([quick])."""

from __future__ import annotations

import math
import statistics

import pytest

from fedopt.claims import Claim, cell_metric, higher_is_better, judge, parse_claims
from fedopt.compare import load_sweep
from fedopt.errors import ConfigError
from fedopt.tuning import Tune, choose, dotted, format_tuning, parse_tune

STRATS = ("a", "b", "c")
SETTINGS = ("iid", "skew")

# ------------------------------------------------------------------ helpers


def claim(**kw):
    row = {"claim": "a claim", "better": "a", "than": "b", **kw}
    (out,) = parse_claims([row], strategies=STRATS, settings=SETTINGS)
    return out


def table(data):
    """``values`` for :func:`judge` from ``{(strategy, setting): {seed: metric}}``."""
    return lambda strategy, setting: data.get((strategy, setting), {})


A = {0: 0.8, 1: 0.9, 2: 0.7}
B = {0: 0.6, 1: 0.8, 2: 0.6}
MEAN = (0.2 + 0.1 + 0.1) / 3  # 0.1333...
SE = statistics.stdev([0.2, 0.1, 0.1]) / math.sqrt(3)  # 0.0333...


def tune(**kw):
    raw = {"key": "client.lr", "values": [0.01, 0.1, 1.0], "seeds": [100], **kw}
    return parse_tune(raw, strategies=STRATS, seeds=[0, 1, 2])


BASE = """name = "tiny"

[data]
name = "digits"
test_fraction = 0.2

[partition]
name = "iid"
num_clients = 4
test_fraction = 0.2

[model]
name = "mlp"
hidden = [16]

[client]
name = "sgd"
epochs = 1
batch_size = 16
lr = 0.2

[strategy]
name = "fedavg"

[run]
rounds = 5
seed = 0
"""

SWEEP = """name = "sw"
base = "base.toml"
seeds = [0, 1, 2]
target_accuracy = 0.9

[scenario]
run.rounds = 4

[[strategies]]
label = "a"
strategy.name = "fedavg"

[[strategies]]
label = "b"
strategy.name = "fedprox"
strategy.proximal_mu = 0.01

[[strategies]]
label = "c"
strategy.name = "fedavg"
client.epochs = 2

[[settings]]
label = "iid"

[[settings]]
label = "skew"
partition.name = "dirichlet"
partition.alpha = 0.1
"""


def write(tmp_path, extra="", sweep=SWEEP):
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "sweep.toml"
    path.write_text(sweep + extra)
    return path


def one_line(err: ConfigError, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text
    for needle in needles:
        assert needle in text


# ------------------------------------------------------------------ direction


@pytest.mark.parametrize(
    ("metric", "higher"),
    [
        ("final_accuracy", True),
        ("best_accuracy", True),
        ("final_loss", False),
        ("bytes_total", False),
        ("bytes_per_round", False),
        ("rounds_to_target", False),
        ("sim_time_to_target", False),
        ("final_perplexity", False),
        ("final_accuracy_std", False),
    ],
)
def test_direction_by_metric_name(metric, higher):
    assert higher_is_better(metric) is higher


def test_direction_override_and_bad_direction():
    assert higher_is_better("final_loss", "higher") is True
    assert higher_is_better("final_accuracy", "lower") is False
    with pytest.raises(ConfigError) as info:
        higher_is_better("final_accuracy", "up")
    assert info.value.key == "expect.direction"
    one_line(info.value, "'up'")


# ------------------------------------------------------------------ parse_claims


def test_parse_defaults():
    c = claim()
    assert c == Claim(
        claim="a claim",
        kind="beats",
        better="a",
        than="b",
        metric="final_accuracy",
        settings=SETTINGS,
        margin=0.0,
        tolerance=0.0,
        value=None,
        higher_is_better=True,
    )
    assert parse_claims(None, strategies=STRATS, settings=SETTINGS) == ()


def test_parse_fields():
    c = claim(kind="matches", tolerance=-0.02, settings=["skew"], metric="bytes_total")
    assert c.tolerance == 0.02  # its magnitude
    assert c.settings == ("skew",) and c.higher_is_better is False
    c = claim(kind="at_most", value=3, than="nobody", metric="final_loss")
    assert c.than is None and c.value == 3.0  # at_most has no `than` to check
    assert claim(margin=0.05, direction="lower").margin == 0.05
    assert claim(direction="lower").higher_is_better is False


@pytest.mark.parametrize(
    ("row", "key", "shown"),
    [
        ({"kind": "wins"}, "expect[0].kind", "'wins'"),
        ({"better": "fedavgg"}, "expect[0].better", "'fedavgg'"),
        ({"than": "zz"}, "expect[0].than", "'zz'"),
        ({"settings": ["iid", "nope"]}, "expect[0].settings", "'nope'"),
        ({"settings": []}, "expect[0].settings", "[]"),
        ({"settings": "iid"}, "expect[0].settings", "'iid'"),
        ({"kind": "gap_grows", "settings": ["iid"]}, "expect[0].settings", "['iid']"),
        ({"kind": "at_most"}, "expect[0].value", "None"),
        ({"margin": "big"}, "expect[0].margin", "'big'"),
        ({"margin": True}, "expect[0].margin", "True"),
        ({"tolerance": math.inf}, "expect[0].tolerance", "inf"),
        ({"metric": ""}, "expect[0].metric", "''"),
        ({"claim": ""}, "expect[0].claim", "''"),
        ({"colour": "red"}, "expect[0].colour", "'red'"),
        ({"direction": "sideways"}, "expect.direction", "'sideways'"),
    ],
)
def test_parse_rejects_bad_rows(row, key, shown):
    raw = [{"claim": "ok", "better": "a", "than": "b", **row}]
    with pytest.raises(ConfigError) as info:
        parse_claims(raw, strategies=STRATS, settings=SETTINGS)
    assert info.value.key == key
    one_line(info.value, key, shown)


def test_parse_suggests_close_label_and_names_row_index():
    rows = [{"claim": "ok", "better": "a", "than": "b"}, {"claim": "x", "better": "fedprx"}]
    with pytest.raises(ConfigError) as info:
        parse_claims(rows, strategies=["fedavg", "fedprox"], settings=["s"])
    assert info.value.key == "expect[0].better"  # row 0 names "a", not a label here
    with pytest.raises(ConfigError) as info:
        parse_claims(rows[1:], strategies=["fedavg", "fedprox"], settings=["s"])
    assert info.value.key == "expect[0].better"
    assert "did you mean 'fedprox'" in str(info.value)


def test_parse_rejects_non_array():
    with pytest.raises(ConfigError) as info:
        parse_claims({"claim": "x"}, strategies=STRATS, settings=SETTINGS)
    assert info.value.key == "expect"


# ------------------------------------------------------------------ judge


def test_beats_paired_mean_and_se():
    (v,) = judge(claim(settings=["iid"]), table({("a", "iid"): A, ("b", "iid"): B}))
    assert v.estimate == pytest.approx(MEAN)
    assert v.stderr == pytest.approx(SE)
    assert v.seeds == 3 and v.holds and v.word == "holds"
    assert "iid" in v.detail and "+0.1333" in v.detail


def test_beats_margin_threshold():
    data = table({("a", "iid"): A, ("b", "iid"): B})
    # holds iff mean - margin > SE: 0.1333 - m > 0.0333  <=>  m < 0.1
    (v,) = judge(claim(settings=["iid"], margin=0.09), data)
    assert v.holds
    (v,) = judge(claim(settings=["iid"], margin=0.11), data)
    assert not v.holds and v.word == "does not hold"
    # b over a: mean -0.1333, nowhere near
    (v,) = judge(claim(settings=["iid"], better="b", than="a"), data)
    assert v.estimate == pytest.approx(-MEAN) and not v.holds


def test_beats_needs_more_than_one_se():
    # diffs 0.1, 0.0, 0.2: mean 0.1, SE 0.1/sqrt(3) = 0.0577 -> holds
    # diffs 0.3, -0.2, 0.2: mean 0.1, SE = stdev/sqrt(3) = 0.153 -> does not
    b = {0: 0.5, 1: 0.5, 2: 0.5}
    (v,) = judge(
        claim(settings=["iid"]), table({("a", "iid"): {0: 0.6, 1: 0.5, 2: 0.7}, ("b", "iid"): b})
    )
    assert v.estimate == pytest.approx(0.1) and v.stderr == pytest.approx(0.1 / math.sqrt(3))
    assert v.holds
    (v,) = judge(
        claim(settings=["iid"]), table({("a", "iid"): {0: 0.8, 1: 0.3, 2: 0.7}, ("b", "iid"): b})
    )
    se = statistics.stdev([0.3, -0.2, 0.2]) / math.sqrt(3)
    assert v.estimate == pytest.approx(0.1) and v.stderr == pytest.approx(se)
    assert se > 0.1 and not v.holds


def test_beats_pairs_by_seed_only():
    # seed 3 has no partner and seed 5 no counterpart: only seeds 0..2 count
    a = {**A, 3: 99.0}
    b = {**B, 5: -99.0}
    (v,) = judge(claim(settings=["iid"]), table({("a", "iid"): a, ("b", "iid"): b}))
    assert v.seeds == 3 and v.estimate == pytest.approx(MEAN)


def test_beats_one_seed_has_no_se():
    data = table({("a", "iid"): {0: 0.8}, ("b", "iid"): {0: 0.7}})
    (v,) = judge(claim(settings=["iid"]), data)
    assert v.stderr is None and v.seeds == 1 and v.estimate == pytest.approx(0.1)
    assert v.holds  # exceeds margin 0
    (v,) = judge(claim(settings=["iid"], margin=0.1 + 1e-9), data)
    assert not v.holds
    assert "±" not in v.detail


def test_lower_is_better_flips_direction():
    # bytes: a sends fewer bytes than b -> a "beats" b
    a = {0: 100.0, 1: 200.0, 2: 300.0}
    b = {0: 150.0, 1: 260.0, 2: 340.0}
    data = table({("a", "iid"): a, ("b", "iid"): b})
    (v,) = judge(claim(settings=["iid"], metric="bytes_total"), data)
    assert v.estimate == pytest.approx(50.0) and v.holds  # advantages 50, 60, 40
    assert v.stderr == pytest.approx(statistics.stdev([50, 60, 40]) / math.sqrt(3))
    (v,) = judge(claim(settings=["iid"], metric="bytes_total", better="b", than="a"), data)
    assert v.estimate == pytest.approx(-50.0) and not v.holds
    # the same numbers read as accuracies: b is the better one
    (v,) = judge(claim(settings=["iid"], metric="bytes_total", direction="higher"), data)
    assert v.estimate == pytest.approx(-50.0) and not v.holds


def test_one_verdict_per_setting_in_claim_order():
    data = table({("a", "iid"): A, ("b", "iid"): B, ("a", "skew"): B, ("b", "skew"): A})
    got = judge(claim(settings=["skew", "iid"]), data)
    assert [v.detail.split(":")[0] for v in got] == ["skew", "iid"]
    assert [v.holds for v in got] == [False, True]
    assert got[0].estimate == pytest.approx(-MEAN)


def test_no_worse():
    data = table({("a", "iid"): B, ("b", "iid"): A})  # a is 0.1333 behind
    (v,) = judge(claim(kind="no_worse", settings=["iid"]), data)
    assert v.estimate == pytest.approx(-MEAN) and not v.holds
    (v,) = judge(claim(kind="no_worse", settings=["iid"], tolerance=0.14), data)
    assert v.holds
    (v,) = judge(claim(kind="no_worse", settings=["iid"], tolerance=0.13), data)
    assert not v.holds
    same = table({("a", "iid"): A, ("b", "iid"): A})
    (v,) = judge(claim(kind="no_worse", settings=["iid"]), same)
    assert v.estimate == 0.0 and v.holds  # ties are no worse


def test_matches_tolerance_both_ways():
    for better, than in (("a", "b"), ("b", "a")):
        data = table({("a", "iid"): A, ("b", "iid"): B})
        c = claim(kind="matches", settings=["iid"], better=better, than=than, tolerance=0.14)
        (v,) = judge(c, data)
        assert v.holds and abs(v.estimate) == pytest.approx(MEAN)
        c = claim(kind="matches", settings=["iid"], better=better, than=than, tolerance=0.13)
        (v,) = judge(c, data)
        assert not v.holds


def test_at_most():
    data = table({("a", "iid"): {0: 3.0, 1: 5.0, 2: 4.0}})
    c = claim(kind="at_most", value=4.0, settings=["iid"], metric="final_loss")
    (v,) = judge(c, data)
    assert v.holds and v.estimate == pytest.approx(4.0) and v.seeds == 3
    assert v.stderr == pytest.approx(1.0 / math.sqrt(3))
    (v,) = judge(claim(kind="at_most", value=3.99, settings=["iid"]), data)
    assert not v.holds and "at most 3.99" in v.detail


def test_gap_grows():
    # advantage of a over b: at iid 0.2, 0.1, 0.1; at skew 0.05, 0.05, 0.0
    data = table(
        {
            ("a", "iid"): A,
            ("b", "iid"): B,
            ("a", "skew"): {0: 0.55, 1: 0.55, 2: 0.5},
            ("b", "skew"): {0: 0.5, 1: 0.5, 2: 0.5},
        }
    )
    got = judge(claim(kind="gap_grows", settings=["iid", "skew"]), data)
    assert len(got) == 1  # one verdict in all
    (v,) = got
    growth = [0.15, 0.05, 0.1]
    assert v.estimate == pytest.approx(0.1) and v.seeds == 3
    assert v.stderr == pytest.approx(statistics.stdev(growth) / math.sqrt(3))
    assert v.holds  # 0.1 > 0.0289
    assert "+0.1333 at iid" in v.detail and "+0.03333 at skew" in v.detail
    # read the other way round (settings[0] = skew) the gap shrinks
    (v,) = judge(claim(kind="gap_grows", settings=["skew", "iid"]), data)
    assert v.estimate == pytest.approx(-0.1) and not v.holds


def test_gap_grows_uses_first_and_last_setting_only():
    strategies, settings = ("a", "b"), ("s0", "s1", "s2")
    (c,) = parse_claims(
        [{"claim": "x", "kind": "gap_grows", "better": "a", "than": "b"}],
        strategies=strategies,
        settings=settings,
    )
    assert c.settings == settings
    data = {
        ("a", "s0"): {0: 1.0, 1: 1.0},
        ("b", "s0"): {0: 0.0, 1: 0.0},
        ("a", "s1"): {0: 0.0, 1: 0.0},  # the middle one would break the claim if used
        ("b", "s1"): {0: 9.0, 1: 9.0},
        ("a", "s2"): {0: 0.5, 1: 0.3},
        ("b", "s2"): {0: 0.0, 1: 0.0},
    }
    (v,) = judge(c, table(data))
    assert v.estimate == pytest.approx(0.6)  # growth 0.5, 0.7
    assert v.stderr == pytest.approx(statistics.stdev([0.5, 0.7]) / math.sqrt(2))
    assert v.holds


def test_gap_grows_lower_is_better():
    # rounds to target: a needs 5 fewer rounds at iid and 1 fewer at skew
    data = table(
        {
            ("a", "iid"): {0: 10.0, 1: 12.0},
            ("b", "iid"): {0: 15.0, 1: 17.0},
            ("a", "skew"): {0: 20.0, 1: 21.0},
            ("b", "skew"): {0: 21.0, 1: 22.0},
        }
    )
    (v,) = judge(claim(kind="gap_grows", metric="rounds_to_target"), data)
    assert v.estimate == pytest.approx(4.0) and v.stderr == 0.0 and v.holds


@pytest.mark.parametrize("kind", ["beats", "no_worse", "matches"])
def test_missing_strategy_does_not_hold(kind):
    data = table({("a", "iid"): A})  # b never finished
    (v,) = judge(claim(kind=kind, settings=["iid"]), data)
    assert not v.holds and v.seeds == 0 and math.isnan(v.estimate) and v.stderr is None
    assert "no finished runs" in v.detail


def test_missing_runs_for_at_most_and_gap_grows():
    (v,) = judge(claim(kind="at_most", value=1.0, settings=["skew"]), table({}))
    assert not v.holds and v.seeds == 0 and "skew" in v.detail
    data = table({("a", "iid"): A, ("b", "iid"): B})  # nothing at skew
    (v,) = judge(claim(kind="gap_grows"), data)
    assert not v.holds and v.seeds == 0 and "iid vs skew" in v.detail


def test_disjoint_seeds_are_missing():
    data = table({("a", "iid"): {0: 0.9}, ("b", "iid"): {1: 0.1}})
    (v,) = judge(claim(settings=["iid"]), data)
    assert not v.holds and v.seeds == 0


# ------------------------------------------------------------------ cell_metric

ROWS = [
    {"round": 1, "central_accuracy": 0.5, "central_loss": 1.2, "bytes_down": 100, "bytes_up": 50,
     "sim_time": 1.5, "lr_global": 0.3},
    {"round": 2, "central_accuracy": 0.8, "central_loss": 0.7, "bytes_down": 100, "bytes_up": 50,
     "sim_time": 3.0, "lr_global": 0.2},
    {"round": 3, "central_accuracy": 0.92, "central_loss": 0.4, "bytes_down": 100, "bytes_up": 50,
     "sim_time": 4.5},
]  # fmt: skip


def test_cell_metric_summary_keys():
    assert cell_metric(ROWS, {}, "final_accuracy", target=None) == 0.92
    assert cell_metric(ROWS, {}, "best_loss", target=None) == 0.4
    assert cell_metric(ROWS, {}, "bytes_total", target=None) == 450.0
    assert cell_metric(ROWS, {}, "bytes_up_total", target=None) == 150.0
    # the run's own summary wins over the one recomputed from rows
    assert cell_metric(ROWS, {"final_accuracy": 0.5}, "final_accuracy", target=None) == 0.5


def test_cell_metric_bytes_per_round():
    assert cell_metric(ROWS, {}, "bytes_per_round", target=None) == pytest.approx(150.0)
    assert cell_metric(ROWS, {"bytes_total": 900}, "bytes_per_round", target=None) == 300.0
    assert cell_metric([], {}, "bytes_per_round", target=None) is None


def test_cell_metric_rounds_to_target():
    assert cell_metric(ROWS, {}, "rounds_to_target", target=0.9) == 3.0
    assert cell_metric(ROWS, {}, "rounds_to_target", target=0.8) == 2.0
    assert cell_metric(ROWS, {}, "rounds_to_target", target=0.5) == 1.0
    # never reached: censored at the run's length
    assert cell_metric(ROWS, {}, "rounds_to_target", target=0.95) == 3.0
    assert cell_metric(ROWS, {"rounds": 40}, "rounds_to_target", target=0.95) == 40.0
    assert cell_metric(ROWS[:2], {}, "rounds_to_target", target=0.95) == 2.0


def test_cell_metric_time_to_target():
    assert cell_metric(ROWS, {}, "sim_time_to_target", target=0.8) == 3.0
    assert cell_metric(ROWS, {}, "sim_time_to_target", target=0.95) == 4.5  # censored


@pytest.mark.parametrize("metric", ["rounds_to_target", "sim_time_to_target"])
def test_cell_metric_target_metrics_need_a_target(metric):
    with pytest.raises(ConfigError) as info:
        cell_metric(ROWS, {}, metric, target=None)
    one_line(info.value, "expect.metric", metric, "target_accuracy")


def test_cell_metric_last_row_value():
    assert cell_metric(ROWS, {}, "lr_global", target=None) == 0.2  # last value it took
    assert cell_metric(ROWS, {}, "central_loss", target=None) == 0.4
    assert cell_metric(ROWS, {}, "never_logged", target=None) is None


# ------------------------------------------------------------------ tuning


def test_dotted():
    assert dotted("client.lr", 0.1) == {"client": {"lr": 0.1}}
    assert dotted("a.b.c", [1]) == {"a": {"b": {"c": [1]}}}


def test_parse_tune_defaults():
    assert parse_tune(None, strategies=STRATS, seeds=[0]) is None
    t = parse_tune({"key": "client.lr", "values": [0.1, 0.3]}, strategies=STRATS, seeds=[0])
    assert t == Tune(
        key="client.lr",
        values=(0.1, 0.3),
        metric="final_accuracy",
        seeds=(1000,),
        strategies=STRATS,
        higher_is_better=True,
    )
    t = tune(metric="rounds_to_target", strategies=["b"], seeds=[7, 8])
    assert t.higher_is_better is False and t.strategies == ("b",) and t.seeds == (7, 8)
    assert tune(metric="final_loss", direction="higher").higher_is_better is True


@pytest.mark.parametrize(
    ("raw", "key", "shown"),
    [
        ({"key": "lr"}, "tune.key", "'lr'"),
        ({"key": "client."}, "tune.key", "'client.'"),
        ({"key": 3}, "tune.key", "3"),
        ({"values": [0.1]}, "tune.values", "[0.1]"),
        ({"values": 0.1}, "tune.values", "0.1"),
        ({"seeds": [1, 100]}, "tune.seeds", "shared: [1]"),
        ({"seeds": []}, "tune.seeds", "[]"),
        ({"seeds": [-1]}, "tune.seeds", "[-1]"),
        ({"seeds": [True]}, "tune.seeds", "[True]"),
        ({"strategies": ["a", "x"]}, "tune.strategies", "'x'"),
        ({"strategies": []}, "tune.strategies", "[]"),
        ({"metric": ""}, "tune.metric", "''"),
        ({"grid": [1, 2]}, "tune.grid", "[1, 2]"),
        ({"direction": "up"}, "expect.direction", "'up'"),
    ],
)
def test_parse_tune_rejects(raw, key, shown):
    with pytest.raises(ConfigError) as info:
        tune(**raw)
    assert info.value.key == key
    one_line(info.value, key, shown)


def test_parse_tune_rejects_non_table():
    with pytest.raises(ConfigError) as info:
        parse_tune([1], strategies=STRATS, seeds=[0])
    assert info.value.key == "tune"


def test_choose_best_mean_per_pair():
    t = tune()
    results = {
        ("a", "iid", 0.01): [0.5, 0.7],  # mean 0.6
        ("a", "iid", 0.1): [0.8, 0.6],  # mean 0.7  <- best
        ("a", "iid", 1.0): [0.9, 0.3],  # mean 0.6 (best single run, worse mean)
        ("b", "iid", 0.01): [0.9],
        ("b", "iid", 0.1): [0.2],
        ("b", "iid", 1.0): [0.1],
    }
    assert choose(t, results) == {("a", "iid"): 0.1, ("b", "iid"): 0.01}


def test_choose_lower_is_better():
    t = tune(metric="rounds_to_target")
    results = {("a", "iid", 0.01): [30.0], ("a", "iid", 0.1): [12.0], ("a", "iid", 1.0): [20.0]}
    assert choose(t, results) == {("a", "iid"): 0.1}


def test_choose_ties_go_to_earlier_grid_value():
    t = tune()
    results = {("a", "iid", 0.01): [0.5], ("a", "iid", 0.1): [0.7], ("a", "iid", 1.0): [0.7]}
    assert choose(t, results) == {("a", "iid"): 0.1}


def test_choose_ties_follow_the_grid_not_the_dict_order():
    # choose() is handed a mapping; the grid order is tune.values, not insertion order.
    t = tune()
    results = {("a", "iid", 1.0): [0.7], ("a", "iid", 0.1): [0.7], ("a", "iid", 0.01): [0.5]}
    assert choose(t, results) == {("a", "iid"): 0.1}


def test_choose_diverged_counts_worst():
    t = tune()
    results = {("a", "iid", 0.01): [0.1], ("a", "iid", 0.1): [0.2], ("a", "iid", 1.0): [None]}
    assert choose(t, results) == {("a", "iid"): 0.1}
    # lower-is-better: a diverged run is not "0 rounds"
    t = tune(metric="rounds_to_target")
    results = {("a", "iid", 0.01): [30.0], ("a", "iid", 0.1): [None], ("a", "iid", 1.0): [25.0]}
    assert choose(t, results) == {("a", "iid"): 1.0}
    # all diverged: the earliest value
    results = {("a", "iid", v): [None] for v in (0.01, 0.1, 1.0)}
    assert choose(t, results) == {("a", "iid"): 0.01}


def test_choose_a_value_with_a_diverged_seed_loses_to_one_without():
    # Two tuning seeds; at lr=1.0 one of them diverged. "A run that diverged counts as
    # the worst", so 1.0 must not win on the mean of its surviving seed alone.
    t = tune(seeds=[100, 101])
    results = {
        ("a", "iid", 0.01): [0.5, 0.5],
        ("a", "iid", 0.1): [0.8, 0.8],
        ("a", "iid", 1.0): [0.95, None],
    }
    assert choose(t, results) == {("a", "iid"): 0.1}


def test_format_tuning():
    t = tune(seeds=[100, 101])
    results = {
        ("a", "iid", 0.01): [0.5, 0.7],
        ("a", "iid", 0.1): [0.8, 0.6],
        ("a", "iid", 1.0): [None, None],
        ("b", "iid", 0.01): [0.9, None],
    }
    chosen = {("a", "iid"): 0.1, ("b", "iid"): 0.01}
    text = format_tuning(t, results, chosen)
    head, table_ = text.split("\n\n")
    assert head == (
        "Tuned client.lr per (setting, strategy) on seeds 100, 101 by final_accuracy "
        "(higher is better):"
    )
    assert table_.splitlines() == [
        "| setting | strategy | client.lr=0.01 | client.lr=0.1 | client.lr=1.0 | chosen |",
        "|---|---|---|---|---|---|",
        "| iid | a | 0.6 | 0.7 | — | 0.1 |",
        "| iid | b | 0.9 | — | — | 0.01 |",
    ]
    assert "(lower is better)" in format_tuning(tune(metric="final_loss"), {}, {})


# ------------------------------------------------------------------ sweeps


def test_sweep_loads_claims_and_tune(tmp_path):
    extra = """
[[expect]]
claim = "b beats a under skew"
better = "b"
than = "a"
settings = ["skew"]
margin = 0.01

[[expect]]
claim = "a's loss stays small"
kind = "at_most"
better = "a"
metric = "final_loss"
value = 0.5

[tune]
key = "client.lr"
values = [0.05, 0.2]
seeds = [10, 11]
strategies = ["a", "b"]
"""
    s = load_sweep(write(tmp_path, extra))
    assert [c.claim for c in s.claims] == ["b beats a under skew", "a's loss stays small"]
    assert s.claims[0].settings == ("skew",) and s.claims[0].margin == 0.01
    assert s.claims[1].settings == ("iid", "skew") and s.claims[1].higher_is_better is False
    assert s.tune is not None and s.tune.values == (0.05, 0.2) and s.tune.seeds == (10, 11)
    assert len(s.cells()) == 2 * 3 * 3


def test_tuning_cells_cover_the_grid(tmp_path):
    extra = (
        '\n[tune]\nkey = "client.lr"\nvalues = [0.05, 0.2]\n'
        'seeds = [10, 11]\nstrategies = ["a", "c"]\n'
    )
    s = load_sweep(write(tmp_path, extra))
    grid = s.tuning_cells()
    # 2 settings x 2 tuned strategies x 2 values x 2 seeds, settings outermost
    assert len(grid) == 16
    keys = [(st.label, se.label, v, seed) for st, se, v, seed, _ in grid]
    assert keys[:4] == [
        ("a", "iid", 0.05, 10),
        ("a", "iid", 0.05, 11),
        ("a", "iid", 0.2, 10),
        ("a", "iid", 0.2, 11),
    ]
    assert {k[0] for k in keys} == {"a", "c"}
    for st, se, value, seed, sc in grid:
        d = sc.to_dict()
        assert d["client"]["lr"] == value and d["run"]["seed"] == seed
        assert d["run"]["rounds"] == 4 and sc.name == "sw"
        assert d["partition"]["name"] == ("dirichlet" if se.label == "skew" else "iid")
        assert d["client"]["epochs"] == (2 if st.label == "c" else 1)
    assert load_sweep(write(tmp_path)).tuning_cells() == []


def test_cells_apply_chosen_values(tmp_path):
    extra = '\n[tune]\nkey = "client.lr"\nvalues = [0.05, 0.2]\nseeds = [10]\nstrategies = ["a"]\n'
    s = load_sweep(write(tmp_path, extra))
    chosen = {("a", "skew"): 0.05, ("a", "iid"): 0.2}
    lrs = {
        (st.label, se.label, seed): sc.to_dict()["client"]["lr"]
        for st, se, seed, sc in s.cells(chosen)
    }
    assert lrs[("a", "skew", 0)] == lrs[("a", "skew", 2)] == 0.05
    assert lrs[("a", "iid", 1)] == 0.2
    assert lrs[("b", "skew", 0)] == lrs[("c", "iid", 2)] == 0.2  # untuned: the base's lr
    assert {v for v in lrs.values()} == {0.05, 0.2}
    # the same chosen table for a sweep without [tune] changes nothing
    plain = load_sweep(write(tmp_path))
    assert {sc.to_dict()["client"]["lr"] for *_, sc in plain.cells(chosen)} == {0.2}


def test_cells_chosen_value_is_validated(tmp_path):
    extra = '\n[tune]\nkey = "client.lr"\nvalues = [0.05, 0.2]\nseeds = [10]\n'
    s = load_sweep(write(tmp_path, extra))
    with pytest.raises(ConfigError):
        s.cells({("a", "iid"): "fast"})


def test_tune_bad_key_is_caught_at_load(tmp_path):
    extra = '\n[tune]\nkey = "client.lrr"\nvalues = [0.05, 0.2]\nseeds = [10]\n'
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, extra))
    assert "lrr" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('\n[[expect]]\nclaim = "x"\nbetter = "a"\nthan = "d"\n', "expect[0].than"),
        (
            '\n[[expect]]\nclaim = "x"\nbetter = "a"\nthan = "b"\nsettings = ["iidd"]\n',
            "expect[0].settings",
        ),
        ('\n[[expect]]\nclaim = "x"\nkind = "wins"\nbetter = "a"\nthan = "b"\n', "expect[0].kind"),
        ('\n[tune]\nkey = "client.lr"\nvalues = [0.1, 0.2]\nseeds = [2]\n', "tune.seeds"),
        ('\n[tune]\nkey = "client.lr"\nvalues = [0.1]\n', "tune.values"),
        (
            '\n[tune]\nkey = "client.lr"\nvalues = [0.1, 0.2]\nstrategies = ["z"]\n',
            "tune.strategies",
        ),
    ],
)
def test_sweep_rejects_bad_expect_and_tune(tmp_path, extra, key):
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, extra))
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_sweep_rejects_unknown_top_level_key(tmp_path):
    path = write(tmp_path, sweep="expectt = 1\n" + SWEEP)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.key == "expectt" and "did you mean 'expect'" in str(info.value)


QUICK = """
[[expect]]
claim = "b beats a"
better = "b"
than = "a"

[[expect]]
claim = "c beats a under skew"
better = "c"
than = "a"
settings = ["skew"]

[[expect]]
claim = "b beats a at iid"
better = "b"
than = "a"
settings = ["iid"]

[[expect]]
claim = "b's loss"
kind = "at_most"
better = "b"
value = 1.0
metric = "final_loss"

[quick]
seeds = [0]
strategies = ["a", "b"]
settings = ["skew"]

[quick.scenario]
run.rounds = 2
"""


def test_quick_tier(tmp_path):
    path = write(tmp_path, QUICK)
    full = load_sweep(path)
    assert full.seeds == (0, 1, 2) and len(full.claims) == 4 and len(full.cells()) == 18
    assert {sc.run.rounds for *_, sc in full.cells()} == {4}
    s = load_sweep(path, quick=True)
    assert s.seeds == (0,)
    assert [v.label for v in s.strategies] == ["a", "b"]
    assert [v.label for v in s.settings] == ["skew"]
    cells = s.cells()
    assert [(st.label, se.label, seed) for st, se, seed, _ in cells] == [
        ("a", "skew", 0),
        ("b", "skew", 0),
    ]
    assert {sc.run.rounds for *_, sc in cells} == {2}
    # claims about c and about iid alone are dropped; the rest are limited to skew
    assert [(c.claim, c.settings) for c in s.claims] == [
        ("b beats a", ("skew",)),
        ("b's loss", ("skew",)),
    ]


def test_quick_with_sets_and_no_quick_table(tmp_path):
    path = write(tmp_path, QUICK)
    s = load_sweep(path, ["run.rounds=3"], quick=True)
    assert {sc.run.rounds for *_, sc in s.cells()} == {3}  # --set wins over [quick]
    plain = write(tmp_path)
    s = load_sweep(plain, quick=True)  # no [quick]: the full sweep
    assert s.seeds == (0, 1, 2) and len(s.cells()) == 18


def test_quick_settings_only_keeps_every_strategy(tmp_path):
    extra = QUICK.replace('strategies = ["a", "b"]\n', "")
    s = load_sweep(write(tmp_path, extra), quick=True)
    assert [v.label for v in s.strategies] == ["a", "b", "c"]
    assert [c.claim for c in s.claims] == ["b beats a", "c beats a under skew", "b's loss"]


def test_quick_tune_overrides_and_seeds(tmp_path):
    extra = """
[tune]
key = "client.lr"
values = [0.01, 0.05, 0.2]
seeds = [10, 11]

[quick]
seeds = [0]

[quick.tune]
values = [0.05, 0.2]
seeds = [10]
"""
    s = load_sweep(write(tmp_path, extra), quick=True)
    assert s.tune is not None and s.tune.values == (0.05, 0.2) and s.tune.seeds == (10,)
    assert len(s.tuning_cells()) == 2 * 3 * 2 * 1
    full = load_sweep(write(tmp_path, extra))
    assert full.tune.values == (0.01, 0.05, 0.2) and len(full.tuning_cells()) == 2 * 3 * 3 * 2


def test_quick_seeds_must_stay_apart_from_tune_seeds(tmp_path):
    extra = (
        '\n[tune]\nkey = "client.lr"\nvalues = [0.05, 0.2]\nseeds = [10]\n\n[quick]\nseeds = [10]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, extra), quick=True)
    assert info.value.key == "tune.seeds"


def test_quick_drops_tuned_strategies_it_leaves_out(tmp_path):
    # [tune] tunes a and c; the quick tier keeps a and b. Like claims about dropped
    # variants, the tuning of a dropped strategy should go, not fail the load.
    extra = """
[tune]
key = "client.lr"
values = [0.05, 0.2]
seeds = [10]
strategies = ["a", "c"]

[quick]
strategies = ["a", "b"]
"""
    s = load_sweep(write(tmp_path, extra), quick=True)
    assert s.tune is not None and s.tune.strategies == ("a",)


def test_quick_drops_a_gap_grows_claim_left_with_one_setting(tmp_path):
    # gap_grows compares two settings; a quick tier keeping one of them has no gap to judge,
    # so the claim is about a dropped variant and should go, not fail the load.
    extra = """
[[expect]]
claim = "the gap grows"
kind = "gap_grows"
better = "a"
than = "b"

[quick]
settings = ["skew"]
"""
    s = load_sweep(write(tmp_path, extra), quick=True)
    assert s.claims == ()


@pytest.mark.parametrize(
    ("quick", "key", "shown"),
    [
        ("rounds = 2\n", "quick.rounds", "2"),
        ('strategies = ["a", "zz"]\n', "quick.strategies", "'zz'"),
        ('settings = ["nope"]\n', "quick.settings", "'nope'"),
        ("seeds = []\n", "seeds", "[]"),
        ('[quick.scenario]\nrun.rounds = "two"\n', "run.rounds", "'two'"),
    ],
)
def test_quick_rejects_bad_entries(tmp_path, quick, key, shown):
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, "\n[quick]\n" + quick), quick=True)
    assert info.value.key == key
    one_line(info.value, key, shown)


def test_quick_rejects_non_table(tmp_path):
    path = write(tmp_path, sweep="quick = 3\n" + SWEEP)
    with pytest.raises(ConfigError) as info:
        load_sweep(path, quick=True)
    assert info.value.key == "quick"
