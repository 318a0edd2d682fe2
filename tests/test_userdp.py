"""User-level DP: Flower's wrappers around fedopt strategies, per-round accounting, client mods."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from inline import run_inline, set_task_identity

from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.records import SelectedGrid
from fedopt.registry import load_builtins
from fedopt.server import build_strategy
from fedopt.task import build_task
from strategies.dp import PrivacyReport

load_builtins()

SIZE = 4000


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def scenario(**user_dp):
    return parse_scenario(
        {
            "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
            "partition": {"num_clients": 8},
            "model": {"name": "logreg"},
            "run": {"rounds": 3, "clients_per_round": 4, "fed_eval_every": 0},
            "user_dp": {"noise_multiplier": 1.0, "clipping_norm": 0.5, **user_dp},
        }
    )


def rdp(history, delta=1e-5):
    """dp-accounting's RDP ε of Poisson-subsampled Gaussian (σ, q, steps) entries."""
    acc = dp_accounting.rdp.RdpAccountant()
    for sigma, q, n in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def round_of(strategy, server_round, updates, weights):
    """Configure 4 nodes, reply current + update_i with weight_i, aggregate."""
    current = ArrayRecord([np.zeros(SIZE, dtype=np.float64)])
    view = SelectedGrid(MockGrid([1, 2, 3, 4, 5, 6, 7, 8]), [1, 2, 3, 4][: len(updates)])
    msgs = list(strategy.configure_train(server_round, current, ConfigRecord(), view))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([u]),
                    "metrics": MetricRecord({"num-examples": w, "cid": i, "train_loss": 1.0}),
                }
            ),
            reply_to=m,
        )
        for i, (m, u, w) in enumerate(zip(msgs, updates, weights, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays.to_numpy_ndarrays()[0], metrics, replies


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


def test_server_fixed_clipping_noise_and_accounting():
    s = scenario(noise="replayable")
    strat = build_strategy(s)
    assert isinstance(strat, PrivacyReport)
    rng = np.random.default_rng(0)
    big = [rng.normal(size=SIZE) * 10 for _ in range(4)]  # every update far above C = 0.5
    out, metrics, replies = round_of(strat, 1, big, [10, 20, 30, 40])
    clipped = np.mean([u * 0.5 / np.linalg.norm(u) for u in big], axis=0)  # equal weights
    noise = out - clipped
    assert noise.std() == pytest.approx(1.0 * 0.5 / 4, rel=0.05)  # z C / (q N)
    q = 4 / 8
    assert metrics["user_epsilon"] == pytest.approx(rdp([(1.0, q, 1)]), rel=1e-12)
    assert metrics["user_noise_multiplier"] == 1.0 and "dp-unit-weight" not in metrics
    assert all("dp-unit-weight" not in r.content["metrics"] for r in replies)
    again, _, _ = round_of(build_strategy(s), 1, big, [10, 20, 30, 40])
    assert np.array_equal(again, out)  # replayable: the noise is seeded by (run seed, round)
    _, m2, _ = round_of(strat, 2, big, [10, 20, 30, 40])
    assert m2["user_epsilon"] == pytest.approx(rdp([(1.0, q, 2)]), rel=1e-12)
    summary = strat.summary_extra()["privacy"]["user_level"]
    assert summary["sample_rate"] == q and summary["sampling"] == "poisson"
    assert summary["adjacency"] == "add/remove one client"
    [run] = summary["events"]
    assert run["count"] == 2 and run["rounds"] == [1, 2]
    assert run["event"]["class_name"] == "PoissonSampledDpEvent"
    assert run["event"]["sampling_probability"] == q


def test_secret_noise_differs_between_keys_and_repeats_with_one():
    from fedopt.privacy.secrecy import NoiseKey

    s = scenario()  # noise = "secret"
    big = [np.full(SIZE, 1.0 + i) for i in range(4)]
    a, _, _ = round_of(build_strategy(s), 1, big, [1] * 4)
    b, _, _ = round_of(build_strategy(s), 1, big, [1] * 4)
    assert not np.array_equal(a, b)  # no key bound: each report draws its own from OS entropy
    key = NoiseKey(bytes(range(32)))
    outs = []
    for _ in range(2):
        strat = build_strategy(s)
        strat.bind_noise_key(key)
        outs.append(round_of(strat, 1, big, [1] * 4)[0])
    assert np.array_equal(*outs)


def test_short_round_keeps_the_planned_multiplier():
    strat = build_strategy(scenario())
    small = [np.full(SIZE, 1e-4 * i) for i in range(1, 4)]
    _, metrics, _ = round_of(strat, 1, small, [1, 1, 1])  # 3 of the 4 clients replied
    # poisson: the denominator stays q·N, so one client fewer does not change the multiplier
    assert metrics["user_noise_multiplier"] == 1.0
    assert metrics["user_epsilon"] == pytest.approx(rdp([(1.0, 0.5, 1)]), rel=1e-12)


def test_target_epsilon_calibrates_z_for_every_round():
    raw = scenario(noise_multiplier=None, target_epsilon=8.0).to_dict()
    raw["partition"]["num_clients"] = 40  # q = 4 / 40
    s = parse_scenario(raw)
    strat = build_strategy(s)
    z = strat.dp.noise_multiplier
    assert s.extras["user_dp"].sample_rate(s) == 0.1
    assert 8.0 - 0.01 <= rdp([(z, 0.1, 3)]) <= 8.0


def test_strategies_that_do_not_average_are_refused():
    raw = scenario().to_dict()
    raw["strategy"] = {"name": "fedmedian"}
    with pytest.raises(ConfigError, match="strategy.name.*FedAvg's mean.*fedavg.*fedprox"):
        parse_scenario(raw)
    with pytest.raises(ConfigError, match="user_dp.target_epsilon"):
        scenario(noise_multiplier=None)
    with pytest.raises(ConfigError, match="user_dp.clipped_count_stddev"):
        scenario(clipping="server_adaptive", noise_multiplier=1.0)


def test_client_side_clipping_mod_clips_the_update_at_the_client():
    s = scenario(clipping="client_fixed", clipping_norm=0.01)
    raw = s.to_dict()
    raw["client"] = {"name": "sgd", "lr": 1.0, "epochs": 3}
    task = build_task(parse_scenario(raw))
    strat = build_strategy(parse_scenario(raw))
    app = make_client_app(lambda ctx: {"": raw})
    start = ArrayRecord(task.new_model().state_dict())
    msg = list(strat.configure_train(1, start, ConfigRecord(), SelectedGrid(MockGrid([7]), [7])))[0]
    msg.content["config"]["cid"] = 0
    ctx = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    reply = app(msg, ctx)
    out = np.concatenate([a.ravel() for a in reply.content["arrays"].to_numpy_ndarrays()])
    before = np.concatenate([a.ravel() for a in start.to_numpy_ndarrays()])
    assert np.linalg.norm(out - before) == pytest.approx(0.01, rel=1e-4)


def test_inline_runs_with_dpsgd_and_adaptive_user_dp_are_reproducible():
    raw = scenario(clipping="server_adaptive", clipped_count_stddev=2.0).to_dict()
    raw["client"] = {"name": "dpsgd", "noise_multiplier": 1.0, "batch_size": 16}
    a, driver, _ = run_inline(parse_scenario(raw))
    b, _, _ = run_inline(parse_scenario(raw))
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in b]
    zs = [r["user_noise_multiplier"] for r in a[1:]]
    # the noise follows the clip each round used: the multiplier stays z however C moves
    assert zs == pytest.approx([1.0] * len(zs), rel=1e-12)
    assert a[-1]["user_epsilon"] == pytest.approx(rdp([(zs[0], 0.5, len(zs))]), rel=1e-12)
    privacy = driver.summary_extra()["privacy"]
    assert set(privacy) == {"sample_level", "user_level"}
    assert privacy["user_level"]["final_clipping_norm"] != 0.5
