"""User-level DP sampling: Poisson's fixed-denominator release, fixed sampling, the ε cap."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inline import InlineGrid, noise_keys_for, set_task_identity

from fedopt.config import parse_scenario
from fedopt.errors import ConfigError, RunError
from fedopt.privacy.secrecy import NoiseKey
from fedopt.privacy.userlevel import UserDPParams
from fedopt.privacy.userlevel_accounting import UserBudgetError, UserLevelLedger, round_event
from fedopt.privacy.userlevel_release import poisson_select
from fedopt.records import SelectedGrid
from fedopt.registry import load_builtins
from fedopt.server import RoundDriver, build_strategy, find_hook
from fedopt.task import build_task, derive_seed
from strategies.dp_report import seeded_numpy

load_builtins()

SIZE = 4000
DELTA = 1e-5
KEY = NoiseKey(bytes(range(32)))


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


def raw(rounds=3, clients=8, per_round=4, **user_dp):
    return {
        "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
        "partition": {"num_clients": clients},
        "model": {"name": "logreg"},
        "run": {"rounds": rounds, "clients_per_round": per_round, "fed_eval_every": 0},
        "user_dp": {"noise_multiplier": 1.0, "clipping_norm": 0.5, **user_dp},
    }


def scenario(**user_dp):
    return parse_scenario(raw(**user_dp))


def round_with(strategy, server_round, updates, *, configured=4, current=None):
    """Configure ``configured`` nodes, let the first ``len(updates)`` reply, aggregate."""
    current = np.zeros(SIZE) if current is None else current
    view = SelectedGrid(MockGrid(range(1, 9)), list(range(1, configured + 1)))
    msgs = list(
        strategy.configure_train(server_round, ArrayRecord([current]), ConfigRecord(), view)
    )
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([current + u]),
                    "metrics": MetricRecord({"num-examples": 1, "cid": i, "train_loss": 1.0}),
                }
            ),
            reply_to=m,
        )
        for i, (m, u) in enumerate(zip(msgs, updates, strict=False))
    ]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays.to_numpy_ndarrays()[0], metrics


def clipped(u, c):
    return u * min(1.0, c / np.linalg.norm(u))


def poisson_rdp(sigma, q, n):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(DELTA)


def wor_rdp(n_pop, k, sigma, n):
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n_pop, k, dp_accounting.GaussianDpEvent(sigma)
    )
    acc.compose(event, n)
    return acc.get_epsilon(DELTA)


class EmptyRoundDriver(RoundDriver):
    """The round loop plus the ``release_empty_round`` call for rounds that drew no one."""

    def train_round(self, grid, server_round, arrays):
        arrays, row = super().train_round(grid, server_round, arrays)
        release = find_hook(self.strategy, "release_empty_round")
        if row["num_clients"] == 0 and "user_epsilon" not in row and release is not None:
            arrays, agg = release(server_round, arrays)
            row.update({k: float(v) for k, v in agg.items()})
        return arrays, row


def run(sc, *, fail_cids=()):
    from fedopt.clientapp import make_client_app

    task = build_task(sc)
    spec = sc.to_dict()
    key, keys = noise_keys_for(sc, KEY)
    grid = InlineGrid(make_client_app(lambda ctx: {"": spec}, noise_keys=keys), task.num_clients)
    grid.fail_cids = set(fail_cids)
    rows = []
    driver = EmptyRoundDriver(task, emit=rows.append)
    driver.bind_noise_key(key)
    driver.run(grid)
    return rows, driver


# -- pinned accounting ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_pop", "m", "rounds", "poisson", "fixed"),
    [
        (10, 5, 5, 8.230652498216635, 26.84077669979158),
        (100, 10, 50, 5.88542727658131, 47.03177410078374),
        (1000, 100, 100, 7.903850223578231, 83.93691709771716),
    ],
)
def test_ledger_epsilon_is_dp_accountings_own(n_pop, m, rounds, poisson, fixed):
    for sampling, sigma, pinned, reference in [
        ("poisson", 1.0, poisson, poisson_rdp(1.0, m / n_pop, rounds)),
        ("fixed", 0.5, fixed, wor_rdp(n_pop, m, 0.5, rounds)),
    ]:
        ledger = UserLevelLedger(accountant="rdp", sampling=sampling, delta=DELTA)
        event = round_event(
            sampling, sigma=sigma, population=n_pop, sample_size=m, sample_rate=m / n_pop
        )
        assert ledger.epsilon_after(event) > 0
        for r in range(1, rounds + 1):
            ledger.record(server_round=r, event=event)
        assert ledger.epsilon == pytest.approx(reference, rel=1e-12)
        assert ledger.epsilon == pytest.approx(pinned, rel=1e-9)


def test_cap_refuses_the_round_that_would_pass_the_target():
    event = round_event("poisson", sigma=1.0, population=8, sample_size=4, sample_rate=0.5)
    target = (poisson_rdp(1.0, 0.5, 3) + poisson_rdp(1.0, 0.5, 4)) / 2
    ledger = UserLevelLedger(
        accountant="rdp", sampling="poisson", delta=DELTA, target_epsilon=target
    )
    for r in (1, 2, 3):
        ledger.record(server_round=r, event=event)
    with pytest.raises(UserBudgetError, match=r"round 4 was not released.*target_epsilon = "):
        ledger.admit(server_round=4, event=event)
    assert ledger.rounds == 3 and ledger.epsilon == pytest.approx(poisson_rdp(1.0, 0.5, 3))


# -- poisson: the release ------------------------------------------------------------------
def test_poisson_round_is_the_noised_sum_over_the_fixed_denominator():
    strat = build_strategy(scenario(noise="replayable"))
    rng = np.random.default_rng(1)
    updates = [rng.normal(size=SIZE) * s for s in (10.0, 1e-3, 5.0)]  # 3 replies, q·N = 4
    current = rng.normal(size=SIZE)
    out, metrics = round_with(strat, 1, updates, current=current)
    seed = strat.round_seed("noise", 1)
    assert seed == derive_seed(strat.scenario.run.seed, 1, 0, 11)
    noise = np.random.default_rng(seed).normal(0.0, 1.0 * 0.5, SIZE)  # z·C
    want = current + (sum(clipped(u, 0.5) for u in updates) + noise) / 4
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    assert metrics["user_epsilon"] == pytest.approx(poisson_rdp(1.0, 0.5, 1), rel=1e-12)
    assert metrics["user_clipping_norm"] == 0.5 and metrics["train_loss"] == 1.0


def test_a_round_without_clients_releases_the_noise_alone_and_is_accounted():
    strat = build_strategy(scenario(noise="replayable"))
    current = np.arange(SIZE, dtype=np.float64)
    arrays, metrics = strat.release_empty_round(1, ArrayRecord([current]))
    noise = np.random.default_rng(strat.round_seed("noise", 1)).normal(0.0, 0.5, SIZE)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0] - current, noise / 4, atol=1e-12)
    assert metrics["user_epsilon"] == pytest.approx(poisson_rdp(1.0, 0.5, 1), rel=1e-12)
    _, m2 = round_with(strat, 2, [np.ones(SIZE)])
    assert m2["user_epsilon"] == pytest.approx(poisson_rdp(1.0, 0.5, 2), rel=1e-12)
    fixed = build_strategy(scenario(sampling="fixed"))
    same, extra = fixed.release_empty_round(1, ArrayRecord([current]))
    assert np.array_equal(same.to_numpy_ndarrays()[0], current) and "user_epsilon" not in extra


def test_an_empty_round_the_loop_does_not_release_stops_the_run():
    strat = build_strategy(scenario())
    assert strat.select_clients(1, [], query=None) == []
    with pytest.raises(RunError, match="round 1 drew no clients.*release_empty_round"):
        round_with(strat, 2, [np.ones(SIZE)])


def test_poisson_draws_each_client_independently_from_the_key():
    strat = build_strategy(scenario())
    strat.bind_noise_key(KEY)
    everyone = list(range(8))
    picks = [strat.select_clients(r, everyone, query=None) for r in range(1, 401)]
    sizes = [len(p) for p in picks]
    assert np.mean(sizes) == pytest.approx(4.0, abs=0.25) and min(sizes) < 3 < 5 < max(sizes)
    again = build_strategy(scenario())
    again.bind_noise_key(KEY)
    assert picks[:20] == [again.select_clients(r, everyone, query=None) for r in range(1, 21)]
    # one client's inclusion does not depend on who else is available
    assert all(
        strat.select_clients(r, [3], query=None) == [3] * (3 in picks[r - 1]) for r in range(1, 50)
    )
    replay = build_strategy(scenario(noise="replayable"))
    seed = derive_seed(replay.scenario.run.seed, 7, 0, 13)
    want = poisson_select(everyone, num_clients=8, sample_rate=0.5, seed=seed)
    assert replay.select_clients(7, everyone, query=None) == want


def test_fixed_sampling_draws_m_clients_from_the_key_or_leaves_it_to_the_loop():
    strat = build_strategy(scenario(sampling="fixed"))
    strat.bind_noise_key(KEY)
    picks = [strat.select_clients(r, [0, 2, 3, 5, 6, 7], query=None) for r in range(1, 30)]
    assert all(len(set(p)) == 4 and set(p) <= {0, 2, 3, 5, 6, 7} for p in picks)
    assert len({tuple(p) for p in picks}) > 3
    assert strat.select_clients(1, [1, 2], query=None) == [1, 2]
    replay = build_strategy(scenario(sampling="fixed", noise="replayable"))
    assert replay.select_clients(1, list(range(8)), query=None) is None  # the loop's draw


def test_poisson_adaptive_clip_moves_with_the_centred_noised_count():
    sc = scenario(noise="replayable", clipping="server_adaptive", clipped_count_stddev=2.0)
    strat = build_strategy(sc)
    z_update, sd = strat.dp.noise_multiplier, strat.dp.clipped_count_stddev
    updates = [np.full(SIZE, 1.0), np.full(SIZE, 1e-5), np.full(SIZE, 2.0)]  # 1 of 3 unclipped
    _, metrics = round_with(strat, 1, updates)
    rng = np.random.default_rng(strat.round_seed("noise", 1))
    rng.normal(0.0, z_update * 0.5, SIZE)  # the update's noise comes first
    fraction = (1 - 3 / 2 + rng.normal(0.0, sd)) / 4 + 0.5
    assert strat.dp.clipping_norm == pytest.approx(0.5 * np.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    assert metrics["user_noise_multiplier"] == pytest.approx(1.0, rel=1e-12)  # z, jointly


# -- fixed: Flower's wrappers, accounted without replacement ---------------------------------
def test_fixed_sampling_is_dp_accountings_without_replacement_event():
    strat = build_strategy(scenario(sampling="fixed", noise="replayable"))
    rng = np.random.default_rng(2)
    big = [rng.normal(size=SIZE) * 10 for _ in range(4)]
    for r in (1, 2):
        _, metrics = round_with(strat, r, big)
        assert metrics["user_noise_multiplier"] == 0.5  # z / 2: replace-one sensitivity 2C/m
        assert metrics["user_epsilon"] == pytest.approx(wor_rdp(8, 4, 0.5, r), rel=1e-12)
    out, metrics = round_with(strat, 3, big[:3])  # 4 drawn, 3 replied
    noise = out - np.mean([clipped(u, 0.5) for u in big[:3]], axis=0)
    assert noise.std() == pytest.approx(1.0 * 0.5 / 3, rel=0.05)  # z·C/m': it tracks the replies
    assert metrics["user_epsilon"] == pytest.approx(wor_rdp(8, 4, 0.5, 3), rel=1e-12)
    summary = strat.summary_extra()["privacy"]["user_level"]
    assert summary["adjacency"] == "replace one client"
    assert summary["neighboring_relation"] == "REPLACE_ONE"
    assert (
        summary["sensitivity"]["formula"] == "2·C / m'" and summary["sensitivity"]["value"] == 0.25
    )


def test_fixed_adaptive_noise_uses_the_round_clip_and_c_follows_the_unclipped_fraction():
    sc = scenario(
        sampling="fixed", noise="replayable", clipping="server_adaptive", clipped_count_stddev=2.0
    )
    strat = build_strategy(sc)
    z_update, sd = strat.dp.noise_multiplier, strat.dp.clipped_count_stddev
    big = [np.full(SIZE, 1.0 + i) for i in range(4)]  # every update clipped
    out, metrics = round_with(strat, 1, big)
    with seeded_numpy(strat.round_seed("noise", 1)):
        count = np.random.normal(4, sd)  # Flower draws the count first
        noise = np.random.normal(0, z_update * 0.5 / 4, SIZE)  # with the round's C, over m' = 4
    np.testing.assert_allclose(
        out, np.mean([clipped(u, 0.5) for u in big], axis=0) + noise, atol=1e-12
    )
    assert strat.dp.clipping_norm == pytest.approx(0.5 * np.exp(-0.2 * ((1 - count / 4) - 0.5)))
    assert strat.dp.clipping_norm > 0.5  # nothing unclipped: C grows towards the quantile
    assert metrics["user_noise_multiplier"] == pytest.approx(0.5, rel=1e-12)
    assert metrics["user_clipping_norm"] == 0.5


def test_seeded_numpy_uses_every_bit_of_the_seed():
    seed = 12345 + 7 * 2**40
    with seeded_numpy(seed):
        a = np.random.normal(size=8)
    with seeded_numpy(seed % 2**32):
        b = np.random.normal(size=8)
    want = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed))).normal(size=8)
    assert np.array_equal(a, want) and not np.array_equal(a, b)


def test_noise_seeds_come_from_the_key_or_the_run_seed():
    bound = build_strategy(scenario())
    bound.bind_noise_key(KEY)
    assert bound.round_seed("noise", 3) == KEY.seed(11, 3)
    lazy = [build_strategy(scenario()).round_seed("noise", 3) for _ in range(2)]
    replay = build_strategy(scenario(noise="replayable")).round_seed("noise", 3)
    assert lazy[0] != lazy[1] and replay not in lazy and replay == derive_seed(0, 3, 0, 11)


# -- configuration -------------------------------------------------------------------------
def test_settings_that_break_the_analysis_are_refused():
    with pytest.raises(
        ConfigError, match=r"user_dp.accountant = 'pld'.*'rdp' under sampling = 'fixed'"
    ):
        scenario(sampling="fixed", accountant="pld")
    with pytest.raises(ConfigError, match=r"user_dp.accountant = 'prv'.*'rdp' or 'pld'"):
        scenario(accountant="prv")
    with pytest.raises(ConfigError, match="user_dp.sampling"):
        scenario(sampling="shuffled")
    spec = raw()
    spec["run"]["min_replies"] = 2
    with pytest.raises(ConfigError, match="run.min_replies"):
        parse_scenario(spec)
    spec = raw()
    spec["curriculum"] = {"ordering": "none", "select": True, "allow_private_scoring": True}
    with pytest.raises(ConfigError, match="curriculum.select"):
        parse_scenario(spec)
    assert UserDPParams(noise_multiplier=1.0).sampling == "poisson"


def test_summary_states_adjacency_noise_secrecy_and_unaccounted_releases():
    for release in (True, False):
        spec = raw(noise="replayable")
        spec["client"] = {
            "name": "dpsgd",
            "noise_multiplier": 1.0,
            "release_train_metrics": release,
        }
        privacy = build_strategy(parse_scenario(spec)).summary_extra()["privacy"]
        sample = privacy["sample_level"]
        assert sample["adjacency"].startswith("add/remove one example")
        assert sample["noise"] == "secret" and "OS entropy" in sample["noise_secrecy"]
        assert sample["unaccounted_releases"] == (
            ["train_loss", "train_accuracy", "examples_sampled"] if release else []
        )
        user = privacy["user_level"]
        assert user["noise"] == "replayable" and "run.seed" in user["noise_secrecy"]
        assert "metrics.jsonl" in user["participation_secrecy"]
        assert "server-private" in user["participation_secrecy"]
        assert user["sensitivity"] == {
            **user["sensitivity"],
            "formula": "C / (q·N)",
            "value": 0.125,
        }


# -- whole runs ----------------------------------------------------------------------------
def rebuild(d):
    """A dp-accounting event from its summary form, as any reader of summary.json would."""
    fields = {
        k: rebuild(v) if isinstance(v, dict) else v for k, v in d.items() if k != "class_name"
    }
    return getattr(dp_accounting, d["class_name"])(**fields)


@pytest.mark.parametrize(
    "user_dp",
    [
        {"clipping": "server_adaptive", "clipped_count_stddev": 2.0},
        {"accountant": "pld"},
        {"sampling": "fixed", "clipping": "client_adaptive", "clipped_count_stddev": 2.0},
    ],
    ids=["poisson-rdp", "poisson-pld", "fixed-rdp"],
)
def test_summary_alone_recomputes_epsilon_with_dp_accounting(user_dp):
    rows, driver = run(parse_scenario(raw(rounds=4, per_round=2, **user_dp)))
    summary = json.loads(json.dumps(driver.summary_extra()["privacy"]["user_level"]))
    accountants = {"rdp": dp_accounting.rdp.RdpAccountant, "pld": dp_accounting.pld.PLDAccountant}
    relation = getattr(dp_accounting.NeighboringRelation, summary["neighboring_relation"])
    acc = accountants[summary["accountant"]](neighboring_relation=relation)
    for entry in summary["events"]:
        acc.compose(rebuild(entry["event"]), entry["count"])
    eps = acc.get_epsilon(summary["delta"])
    assert eps == pytest.approx(summary["epsilon"], rel=1e-9)
    assert eps == pytest.approx(rows[-1]["user_epsilon"], rel=1e-9)
    assert summary["rounds_released"] == 4


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_adaptive_run_with_a_dropped_client_never_passes_target_epsilon(sampling):
    sc = parse_scenario(
        raw(
            noise_multiplier=None,
            target_epsilon=8.0,
            sampling=sampling,
            clipping="server_adaptive",
            clipped_count_stddev=4.0,
        )
    )
    probe = build_strategy(sc)
    probe.bind_noise_key(KEY)
    drawn = [probe.select_clients(r, list(range(8)), query=None) for r in (1, 2, 3)]
    drop = next(c for c in range(8) if all(len(d) > 1 for d in drawn if c in d) and c in drawn[0])
    rows, driver = run(sc, fail_cids={drop})
    assert drop in rows[1]["failed_clients"]
    eps = [r["user_epsilon"] for r in rows[1:]]
    assert len(eps) == 3 and all(e <= 8.0 for e in eps) and eps[-1] >= 8.0 - 0.01
    assert len({r["user_clipping_norm"] for r in rows[1:]}) == 3  # C moved every round


def test_the_cap_stops_the_run_before_the_round_that_would_pass_it(tmp_path, monkeypatch):
    from fedopt.clientapp import make_client_app
    from fedopt.simulation import execute_run

    target = (poisson_rdp(1.0, 0.5, 3) + poisson_rdp(1.0, 0.5, 4)) / 2
    # a z below what the target needs (as a resumed run with more rounds would have)
    monkeypatch.setattr(UserDPParams, "multiplier", lambda self, scenario: 1.0)
    sc = parse_scenario(raw(rounds=6, noise_multiplier=None, target_epsilon=target))
    task = build_task(sc)
    spec = sc.to_dict()
    key, keys = noise_keys_for(sc, KEY)
    grid = InlineGrid(make_client_app(lambda ctx: {"": spec}, noise_keys=keys), task.num_clients)
    with pytest.raises(UserBudgetError, match="round 4 was not released") as info:
        execute_run(grid, task, tmp_path, noise_key=key)
    assert info.value.round == 4 and info.value.epsilon > target
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["user_epsilon"] == pytest.approx(poisson_rdp(1.0, 0.5, 3), rel=1e-12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"].startswith("failed: round 4 was not released")
    assert summary["privacy"]["user_level"]["epsilon"] <= target


def test_a_fixed_round_with_no_one_available_releases_nothing_and_the_run_goes_on():
    strat = build_strategy(scenario(sampling="fixed"))
    assert strat.select_clients(1, [], query=None) == []
    _, metrics = round_with(strat, 2, [np.ones(SIZE)] * 4)
    assert strat.user.rounds == 1 and metrics["user_epsilon"] > 0
