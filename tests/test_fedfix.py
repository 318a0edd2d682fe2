"""FedFix, async FedAvg, FedBuff and sync FedAvg on the clock: weights, equivalence, determinism."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord
from inline import InlineGrid, run_inline, scenario_with, strip_wall

from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.registry import STRATEGIES, load_builtins
from fedopt.task import build_task
from strategies.async_loop import AsyncDriver, Contribution

load_builtins()

RAW = {
    "name": "clock",
    "data": {"name": "blobs", "num_examples": 600, "num_features": 10},
    "partition": {"num_clients": 6, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "steps": 5, "batch_size": 16, "lr": 0.2},
    "heterogeneity": {"speed": "fx", "spread": 80.0, "base_rate": 80.0},
    "strategy": {"name": "fedfix", "time_budget": 4.0},
    "run": {"seed": 1, "fed_eval_every": 0},
}


def scenario(**sets):
    return scenario_with(RAW, **sets)


class PushPullGrid(InlineGrid):
    """push_messages / pull_messages in-process; each pull answers a few replies, shuffled."""

    def __init__(self, app, num_nodes, *, order_seed=0, per_pull=3):
        super().__init__(app, num_nodes)
        self.pending = {}
        self.rng = np.random.default_rng(order_seed)
        self.per_pull = per_pull

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._record(msg, self.sent)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        ids = [i for i in message_ids if i in self.pending]
        self.rng.shuffle(ids)
        return [self.handle(self.pending.pop(i)) for i in ids[: self.per_pull]]


def run_clock(s, *, order_seed=0, per_pull=3, on_row=None):
    task = build_task(s)
    raw = s.to_dict()
    grid = PushPullGrid(
        make_client_app(lambda ctx: {"": raw}), task.num_clients, order_seed=order_seed,
        per_pull=per_pull,
    )  # fmt: skip
    rows = []
    driver = AsyncDriver(task, emit=lambda r: (rows.append(r), on_row and on_row(driver, r)))
    final = driver.run(grid)
    driver.grid = grid
    return rows, driver, final


def test_fedfix_with_period_at_least_the_slowest_client_is_synchronous_fedavg():
    # the slowest client takes 1.0 simulated second (fx 80%, full batches)
    fix, _, fix_final = run_clock(scenario(strategy__delta_t=1.0))
    sync, _, sync_final = run_clock(scenario(strategy__name="sync_fedavg"))
    plain = {**RAW, "strategy": {"name": "fedavg"}, "run": {**RAW["run"], "rounds": 4}}
    core, _, _ = run_inline(parse_scenario(plain))
    assert [r["round"] for r in fix] == [0, 1, 2, 3, 4]
    for a, b, c in zip(fix[1:], sync[1:], core[1:], strict=True):
        assert a["clients"] == b["clients"] == c["clients"] == list(range(6))
        assert a["staleness_max"] == 0
        assert a["central_loss"] == b["central_loss"]  # same update, bit for bit
        assert a["central_loss"] == pytest.approx(c["central_loss"], rel=1e-5)  # Flower's FedAvg
        assert a["sim_time"] == pytest.approx(c["sim_time"])
    for key in fix_final.keys():
        np.testing.assert_array_equal(fix_final[key].numpy(), sync_final[key].numpy())


@pytest.mark.parametrize("name", ["fedfix", "async_fedavg", "fedbuff"])
def test_rows_do_not_depend_on_the_order_replies_arrive_in(name):
    a, _, _ = run_clock(scenario(strategy__name=name), order_seed=0, per_pull=1)
    b, _, _ = run_clock(scenario(strategy__name=name), order_seed=7, per_pull=6)
    assert strip_wall(a) == strip_wall(b)
    assert len(a) > 4


def test_only_versions_held_by_in_flight_clients_are_kept():
    seen = []

    def check(driver, row):
        if row["round"] == 0:
            return
        held = set(driver._pushed.values()) | {driver.versions.current}
        assert driver.versions.held() == sorted(held)
        for v in held - {driver.versions.current}:
            assert driver.versions.holders(v) == list(driver._pushed.values()).count(v)
        seen.append(len(held))

    rows, driver, final = run_clock(scenario(strategy__name="async_fedavg"), on_row=check)
    assert max(seen) > 2  # stale versions were kept while their clients trained
    assert driver.versions.held() == [driver.versions.current]  # all freed after the drain
    assert driver.summary_extra()["versions_held_max"] >= max(seen)
    # every message names the version it carries; messages of one version carry the same model
    by_version = {}
    for msg in driver.grid.sent:
        config = msg.content["config"]
        assert config["server-round"] == config["model-version"] + 1
        w = np.concatenate([a.numpy().ravel() for a in msg.content["arrays"].values()])
        by_version.setdefault(config["model-version"], []).append(w)
    assert len(by_version) > 10
    for ws in by_version.values():
        for w in ws[1:]:
            np.testing.assert_array_equal(w, ws[0])


def test_async_metrics_staleness_and_summary():
    rows, driver, _ = run_clock(scenario(strategy__name="async_fedavg"))
    extra = driver.summary_extra()
    contributions = [c for r in rows[1:] for c in r["clients"]]
    assert all(r["num_clients"] == 1 for r in rows[1:])
    assert extra["contributions"] == len(contributions) == rows[-1]["round"]
    hist = extra["staleness_histogram"]
    assert sum(hist.values()) == len(contributions)
    per = [p["staleness"] for r in rows[1:] for p in r["per_client"].values()]
    assert {str(s): per.count(s) for s in set(per)} == hist
    assert all(r["staleness_max"] == r["staleness_mean"] for r in rows[1:])
    times = [r["sim_time"] for r in rows]
    assert times == sorted(times) and times[-1] <= 4.0 + 1e-9
    # the fastest client (5: 0.2 s per update) contributes about five times as often as client 0
    counts = extra["contributions_per_client"]
    assert counts["5"] == 20 and counts["0"] == 4
    assert rows[-1]["cum_bytes"] == sum(r["bytes_down"] + r["bytes_up"] for r in rows[1:])
    for key in ("central_accuracy", "central_accuracy_tail_std", "train_loss", "versions_held"):
        assert key in rows[-1]


def bound(name, m=4, durations=(1.0, 0.5, 0.25, 0.25), sizes=(10, 20, 30, 40), **params):
    s = parse_scenario({"strategy": {"name": name, **params}})
    strat = STRATEGIES.get(name).obj(s.strategy.params, scenario=s)
    strat.bind(importance=sizes[:m], durations=dict(enumerate(durations[:m])))
    return strat


def contribution(cid, *, span=1, duration=1.0, local=1.0, base=0.0, n=10):
    return Contribution(
        cid=cid,
        arrays=ArrayRecord({"w": Array(np.full(3, local, np.float32))}),
        base=ArrayRecord({"w": Array(np.full(3, base, np.float32))}),
        metrics=MetricRecord({"num-examples": n, "train_loss": float(cid)}),
        span=span,
        staleness=span - 1,
        duration=duration,
    )


def test_weights_follow_the_fedfix_code():
    p = np.array([10, 20, 30, 40]) / 100
    rate = 1 / 1.0 + 1 / 0.5 + 1 / 0.25 + 1 / 0.25  # sum of 1 / tau_j = 11
    fix = bound("fedfix", delta_t=0.3)
    assert fix.weight(contribution(0, span=4)) == pytest.approx(4 * p[0])  # ceil(1.0 / 0.3) p_0
    assert bound("fedfix", weights="identical").weight(contribution(2, span=3)) == 0.25
    assert bound("fedfix", importance="uniform").weight(contribution(1, span=2)) == 0.5
    asy = bound("async_fedavg")
    assert asy.weight(contribution(1, duration=0.5)) == pytest.approx(rate * 0.5 * p[1])
    assert bound("async_fedavg", weights="identical").weight(contribution(3, span=5)) == 1.0
    disc = bound("async_fedavg", weights="identical", staleness_exponent=0.5)
    assert disc.weight(contribution(3, span=4)) == pytest.approx(4**-0.5)
    assert bound("fedbuff", buffer_size=4).weight(contribution(2, span=2)) == 0.25
    buff = bound("fedbuff", buffer_size=2, weights="weight")
    assert buff.weight(contribution(0, duration=1.0)) == pytest.approx(rate * 1.0 * p[0] / 2)
    assert bound("sync_fedavg").weight(contribution(3)) == pytest.approx(p[3])


def test_update_applies_each_delta_from_its_own_start_version():
    strat = bound("fedfix", delta_t=0.3, global_lr=0.5)
    current = ArrayRecord({"w": Array(np.full(3, 2.0, np.float32))})
    contribs = [
        contribution(0, span=4, local=1.5, base=1.0),  # stale: started from an older version
        contribution(3, span=1, local=3.0, base=2.0),
    ]
    new, metrics = strat.aggregate_contributions(5, current, contribs)
    want = 2.0 + 0.5 * (4 * 0.1 * 0.5 + 1 * 0.4 * 1.0)
    np.testing.assert_allclose(new["w"].numpy(), np.full(3, want, np.float32))
    assert metrics["train_loss"] == pytest.approx(1.5)  # example-weighted (10 and 10)
    assert metrics["weight_sum"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"heterogeneity__availability": 0.5}, "heterogeneity.availability"),
        ({"run__clients_per_round": 3}, "run.clients_per_round"),
        ({"strategy__name": "fedbuff", "strategy__buffer_size": 7}, "strategy.buffer_size"),
        ({"strategy__delta_t": 0.0}, "strategy.delta_t"),
        ({"strategy__time_budget": -1.0}, "strategy.time_budget"),
        ({"strategy__weights": "uniform"}, "strategy.weights"),
        (
            {"strategy__name": "fedbuff", "strategy__participation": "measured"},
            "strategy.participation",
        ),
        ({"heterogeneity__duration": "examples"}, "heterogeneity.duration"),
    ],
)
def test_bad_scenarios_are_refused_before_running(sets, key):
    with pytest.raises(ConfigError) as err:
        scenario(**sets)
    assert err.value.key == key


def test_without_a_time_budget_the_run_makes_run_rounds_aggregations():
    s = parse_scenario(
        {**RAW, "strategy": {"name": "fedbuff", "buffer_size": 2}, "run": {"rounds": 3}}
    )
    rows, _, _ = run_clock(s)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["num_clients"] == 2 for r in rows[1:])


@pytest.mark.slow
def test_ray_runs_are_identical_for_one_or_two_workers(tmp_path):
    import fedopt

    s = scenario(strategy__name="async_fedavg", strategy__time_budget=2.0)
    one = fedopt.run(s.replace(**{"run.workers": 1}), out=tmp_path / "one")
    two = fedopt.run(s.replace(**{"run.workers": 2}), out=tmp_path / "two")
    assert strip_wall(one.rows) == strip_wall(two.rows)
    assert len(one.rows) > 10
    assert one.summary["staleness_histogram"] == two.summary["staleness_histogram"]


def test_fedbuff_schedule_participation_is_counted_on_a_hand_built_schedule():
    # durations 1, 2, 3; buffer 2; budget 6. By hand: t=2 {0,1}, t=3 {0,2}, t=4 {0,1},
    # t=6 {0,1} (0 back at 5, 1 and 2 both at 6: the tie goes to 1); the next would be at 7.
    kw = {"buffer_size": 2, "weights": "weight", "importance": "uniform", "time_budget": 6.0}
    durations, sizes = (1.0, 2.0, 3.0), (5, 5, 5)
    buff = bound("fedbuff", m=3, durations=durations, sizes=sizes, participation="schedule", **kw)
    assert buff.fractions == {0: 1.0, 1: 0.75, 2: 0.25}
    got = [buff.weight(contribution(c)) for c in range(3)]
    assert got == pytest.approx([1 / 3, 4 / 9, 4 / 3], rel=1e-15)  # p_i / f_i
    # the long-run share c / (tau_i sum_j 1/tau_j) = 12 / (11 tau_i) overcounts the fast client
    old = bound("fedbuff", m=3, durations=durations, sizes=sizes, **kw)
    assert [old.fraction(c) for c in range(3)] == pytest.approx([12 / 11, 6 / 11, 4 / 11])
    assert old.weight(contribution(0, duration=1.0)) == pytest.approx(11 / 36)
    # without a time budget the schedule is run.rounds aggregations: {0,1} then {0,2}
    s = parse_scenario(
        {"strategy": {"name": "fedbuff", "buffer_size": 2, "weights": "weight",
                      "participation": "schedule"}, "run": {"rounds": 2}}
    )  # fmt: skip
    strat = STRATEGIES.get("fedbuff").obj(s.strategy.params, scenario=s)
    strat.bind(importance=sizes, durations=dict(enumerate(durations)))
    assert strat.fractions == {0: 1.0, 1: 0.5, 2: 0.5}


def test_fedbuff_schedule_fractions_match_the_run():
    s = scenario(
        strategy__name="fedbuff", strategy__buffer_size=2, strategy__weights="weight",
        strategy__participation="schedule",
    )  # fmt: skip
    rows, driver, _ = run_clock(s)
    counts = driver.summary_extra()["contributions_per_client"]
    aggs = rows[-1]["round"]
    assert driver.strategy.fractions == {int(c): n / aggs for c, n in counts.items()}
    p = driver.strategy.importance
    for r in rows[1:]:
        for c, pc in r["per_client"].items():
            assert pc["weight"] == pytest.approx(p[int(c)] * aggs / counts[c], rel=1e-12)


def test_speed_duration_model_times_updates_by_the_speed_spread_only():
    # F-80 over 6 clients: tau_i = 1 - 0.16 i, whatever the client's data size
    tau = [1.0, 0.84, 0.68, 0.52, 0.36, 0.2]
    raw = {  # lognormal sizes: unequal work (5 steps of up to 16 examples each)
        **RAW,
        "partition": {"name": "quantity", "num_clients": 6, "sigma": 2.0},
        "strategy": {"name": "fedfix", "time_budget": 2.0, "delta_t": 0.5},
    }
    rows, driver, _ = run_clock(scenario_with(raw, heterogeneity__duration="speed"))
    extra = driver.summary_extra()
    got = [extra["client_durations"][str(c)] for c in range(6)]
    np.testing.assert_allclose(got, tau, rtol=0, atol=1e-15)
    assert extra["clock"]["duration_model"] == "speed"
    assert extra["clock"]["now"] == rows[-1]["sim_time"] == 2.0
    # participants every ceil(tau_i / 0.5) aggregations: 0-3 every 2nd, 4 and 5 every one
    assert [r["clients"] for r in rows[1:]] == [[4, 5], [0, 1, 2, 3, 4, 5]] * 2
    _, work, _ = run_clock(scenario_with(raw))
    assert work.summary_extra()["clock"]["duration_model"] == "work"
    assert [work.summary_extra()["client_durations"][str(c)] for c in range(6)] != got
