"""FedKSeed: replay equals training, catch-up from any sync point, Pro, one byte, bytes sent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inline import InlineGrid, set_task_identity
from torch import nn

from clients.fedkseed import STATE_ACC, STATE_MODEL, STATE_SYNC, FedKSeedClient, zo_steps
from fedopt import zo
from fedopt.client import ClientJob, ClientState
from fedopt.clientapp import make_client_app
from fedopt.config import parse_scenario
from fedopt.errors import ConfigError
from fedopt.records import SelectedGrid
from fedopt.registry import load_builtins
from fedopt.server import RoundDriver, build_strategy
from fedopt.task import build_task

load_builtins()
W = zo.Wire

RAW = {
    "name": "fedkseed",
    "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
    "partition": {"num_clients": 4, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "fedkseed", "steps": 20, "batch_size": 4, "lr": 0.02, "eps": 1e-3},
    "strategy": {"name": "fedkseed", "k": 64},
    "run": {"rounds": 3, "seed": 2, "fed_eval_every": 0},
}


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()


def scenario(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in RAW.items()}
    for key, value in sections.items():
        section, field = key.split("__")
        if value is None:
            raw[section].pop(field, None)
        else:
            raw[section][field] = value
    return raw, parse_scenario(raw)


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def run(run_key="", **sections):
    """Rounds in-process; returns rows, driver, grid and the model after each aggregation."""
    raw, sc = scenario(**sections)
    task = build_task(sc)
    grid = InlineGrid(make_client_app(lambda ctx: {run_key: raw}), task.num_clients)
    rows = []
    driver = RoundDriver(task, emit=rows.append, run_key=run_key)
    models = [driver.model.state_dict()]
    aggregate = driver.strategy.aggregate_train

    def recording(server_round, replies):
        arrays, metrics = aggregate(server_round, replies)
        models.append({k: v.clone() for k, v in arrays.to_torch_state_dict().items()})
        return arrays, metrics

    driver.strategy.aggregate_train = recording
    driver.run(grid)
    return rows, driver, grid, models


def client_states(grid, run_key=""):
    """(cid, version, model, acc) of every client that synced."""
    out = []
    hosts = [
        (i, ClientState(ctx.state, i, run_key=run_key))
        for i in range(len(grid.contexts))
        for ctx in grid.contexts.values()
    ]
    for i, state in hosts:
        if state.get(STATE_SYNC) is None:
            continue
        out.append(
            (
                i,
                int(state.get(STATE_SYNC)["version"]),
                state.get(STATE_MODEL).to_torch_state_dict(),
                state.get(STATE_ACC)["acc"].numpy(),
            )
        )
    return out


# -- pairing and parameters -------------------------------------------------------------
def test_client_and_strategy_come_as_a_pair():
    with pytest.raises(ConfigError, match="strategy.name"):
        parse_scenario({**RAW, "strategy": {"name": "fedavg"}})
    with pytest.raises(ConfigError, match="client.name"):
        parse_scenario({**RAW, "client": {"name": "sgd"}})
    with pytest.raises(ConfigError, match="strategy.k"):
        parse_scenario({**RAW, "strategy": {"name": "fedkseed", "k": 0}})
    with pytest.raises(ConfigError, match="client.eps"):
        parse_scenario({**RAW, "client": {"name": "fedkseed", "eps": 0.0}})
    parse_scenario({**RAW, "client": {"name": "zo_sgd"}, "strategy": {"name": "fedavg"}})


# -- the replayed model is the trained model ---------------------------------------------
def test_clients_sync_to_the_servers_replayed_model_bitwise():
    rows, driver, grid, models = run()
    states = client_states(grid)
    assert len(states) == 4 and {v for _, v, _, _ in states} == {2}
    for _, version, model, acc in states:
        for name, value in model.items():
            assert torch.equal(value, models[version][name]), name
        assert acc.dtype == np.float32 and np.count_nonzero(acc) > 0
    assert rows[-1]["zo_replayed_mean"] > 0 and np.isfinite(rows[-1]["central_loss"])
    params_mb = sum(p.numel() * 4 for p in driver.model.parameters()) / 2**20
    assert params_mb < rows[-1]["peak_memory_mb_min"] < 4 * params_mb + 0.1
    assert rows[-1]["central_loss"] < rows[0]["central_loss"]


def test_replay_from_any_past_sync_point_gives_the_current_model():
    _, driver, grid, models = run(run__clients_per_round=2, run__rounds=6)
    strat = driver.strategy
    states = client_states(grid)
    assert len({v for _, v, _, _ in states}) >= 2
    for _, _, model, acc in states:
        rebuilt = driver.task.new_model()
        rebuilt.load_state_dict(model, strict=False)
        zo.replay_delta_(zo.Noise(rebuilt), strat.seeds, strat.acc, acc, lr=0.02)
        for name, value in rebuilt.state_dict().items():
            torch.testing.assert_close(value, models[-1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["examples", "equal"])
def test_server_model_is_the_weighted_mean_of_the_client_models(weighting):
    _, sc = scenario(strategy__weighting=weighting, partition__name="dirichlet")
    task = build_task(sc)

    strat = build_strategy(sc)
    strat.bind_model(task.new_model())
    client = FedKSeedClient(sc.client.params, scenario=sc)
    view = SelectedGrid(MockGrid([11, 22, 33, 44]), [11, 22, 33, 44])
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), view))
    replies, locals_, sizes = [], [], []
    for cid, msg in enumerate(msgs):
        x, y = (
            torch.from_numpy(a) for a in (task.client_data(cid)[0].x, task.client_data(cid)[0].y)
        )
        job = ClientJob(
            cid=cid,
            server_round=1,
            model=task.new_model(),
            x=x,
            y=y,
            config=dict(msg.content["config"].items()),
            content=msg.content,
            state=ClientState(RecordDict(), cid),
            generator=torch.Generator().manual_seed(cid),
            device=torch.device("cpu"),
        )
        update = client.fit(job)
        locals_.append({k: v.detach().clone() for k, v in job.model.state_dict().items()})
        sizes.append(update.num_examples)
        metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
        replies.append(
            Message(RecordDict({"arrays": update.arrays, "metrics": metrics}), reply_to=msg)
        )
    arrays, metrics = strat.aggregate_train(1, replies)
    w = np.asarray(sizes, dtype=np.float64) if weighting == "examples" else np.ones(4)
    w = w / w.sum()
    assert len(set(sizes)) > 1  # the two weightings differ
    for name, value in arrays.to_torch_state_dict().items():
        mean = sum(float(wk) * m[name].double() for wk, m in zip(w, locals_, strict=True))
        torch.testing.assert_close(value.double(), mean, rtol=1e-5, atol=1e-6)
    assert metrics["zo_seeds_moved"] == np.count_nonzero(strat.acc) > 0


# -- what travels ---------------------------------------------------------------------------
def per_client(rows):
    return [pc["bytes_down"] + pc["bytes_up"] for r in rows[1:] for pc in r["per_client"].values()]


def test_bytes_per_client_round_at_k4096_and_tau200():
    sets = {"strategy__k": 4096, "client__steps": 200, "client__batch_size": 1, "run__rounds": 2}
    plain, *_ = run(run_key="0-0123456789ab", **sets)
    byte, *_ = run(**sets, strategy__one_byte=True)
    changed, *_ = run(**sets, strategy__sync="changed")
    assert max(per_client(plain)) < 18_000  # the paper's title, with Flower's own framing
    assert min(per_client(plain)) > 16_384 + 4 * 190  # K float32 down + ≥190 (index, scalar) up
    assert max(per_client(byte)) < 6_000  # K one-byte codes down, (index, code) pairs up
    # changed-only: round 1 has nothing to send, round 2 the ≤ 800 seeds of round 1
    r1, r2 = ([pc["bytes_down"] for pc in r["per_client"].values()] for r in changed[1:])
    assert max(r1) < 300 and max(r2) < 800 * 5 + 300  # a 1-byte index gap + a float32


def test_changed_only_sync_never_sends_more_than_all_accumulators():
    # 4 clients x 60 steps on 64 seeds: most seeds change every round
    rows, *_ = run(strategy__sync="changed", client__steps=60)
    full, *_ = run(client__steps=60)
    for a, b in zip(rows[2:], full[2:], strict=True):
        most = max(pc["bytes_down"] for pc in a["per_client"].values())
        assert most <= min(pc["bytes_down"] for pc in b["per_client"].values()) + 16  # "zo-base"


def test_one_byte_accumulators_are_what_the_server_replays():
    _, driver, grid, models = run(strategy__one_byte=True)
    strat = driver.strategy
    assert strat.offset is not None
    np.testing.assert_array_equal(strat.acc, zo.from_bytes(strat._codes, strat.offset))
    for _, version, model, _ in client_states(grid):
        for name, value in model.items():
            assert torch.equal(value, models[version][name])


def test_changed_only_sync_replays_the_same_model():
    _, _, grid, models = run(strategy__sync="changed", run__clients_per_round=2, run__rounds=5)
    for _, version, model, _ in client_states(grid):
        for name, value in model.items():
            torch.testing.assert_close(value, models[version][name], rtol=1e-5, atol=1e-6)


def test_pro_sends_scores_and_clients_sample_by_them():
    rows, driver, grid, _ = run(strategy__pro=True)
    sent = [m for m in grid.sent if W.PAYLOAD in m.content]
    assert all(W.SCORES in m.content[W.PAYLOAD] for m in sent)
    assert 1.0 < rows[-1]["zo_pro_ratio"] <= math.e
    assert driver.strategy.count.sum() == 3 * 4 * 20  # every step of every client entered H
    _, sc = scenario(strategy__pro=True, strategy__k=2, client__steps=2000)
    job = make_job(sc, cid=0, scores=np.array([255, 0], dtype=np.uint8))
    update = FedKSeedClient(sc.client.params, scenario=sc).fit(job)
    counts = zo.wire_values(update.arrays[W.COUNT]).astype(float)
    p0 = math.e / (1 + math.e)
    assert counts.sum() == 2000
    assert abs(counts[0] / 2000 - p0) < 5 * math.sqrt(p0 * (1 - p0) / 2000)


def make_job(sc, *, cid, scores=None, model=None, state=None):
    task = build_task(sc)
    train, _ = task.client_data(cid)
    k = sc.strategy.params.k
    payload = ArrayRecord({W.ACC: zo.wire_array(np.zeros(k, np.float32))})
    if scores is not None:
        payload[W.SCORES] = zo.wire_array(scores)
    config = {"server-round": 1, W.SEED: 7, W.K: k, W.VERSION: 0}
    return ClientJob(
        cid=cid,
        server_round=1,
        model=model if model is not None else task.new_model(),
        x=torch.from_numpy(train.x),
        y=torch.from_numpy(train.y),
        config=config,
        content=RecordDict({W.PAYLOAD: payload, "config": ConfigRecord(config)}),
        state=state or ClientState(RecordDict(), cid),
        generator=torch.Generator().manual_seed(1),
        device=torch.device("cpu"),
    )


# -- the client -----------------------------------------------------------------------------
class NaNWhenPositive(nn.Module):
    """Logits that are NaN for examples whose first feature is positive."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        out = self.lin(x)
        return torch.where(x[:, :1] > 0, torch.full_like(out, math.nan), out)


def test_non_finite_steps_are_skipped():
    _, sc = scenario(client__batch_size=1, client__steps=40)
    job = make_job(sc, cid=0, model=NaNWhenPositive())
    job.x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    job.y = torch.zeros(40, dtype=torch.long)
    res = zo_steps(job, sc.client.params, zo.Noise(job.model), list(range(40)))
    bad = [g is None for g in res.grads]
    assert 0 < sum(bad) < 40 and math.isfinite(res.loss)
    job.x = job.x.abs() + 0.1  # every example NaN: no step taken, the model untouched
    before = [p.detach().clone() for p in job.model.parameters()]
    res = zo_steps(job, sc.client.params, zo.Noise(job.model), list(range(40)))
    assert all(g is None for g in res.grads) and math.isnan(res.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, job.model.parameters(), strict=True))


def test_a_model_reading_parameters_outside_their_modules_is_refused():
    class ReadsChild(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(8, 2)

        def forward(self, x):
            return self.inner(x) + x[:, :2] @ self.inner.weight[:, :2].T

    _, sc = scenario()
    job = make_job(sc, cid=0, model=ReadsChild())
    job.y = torch.zeros(len(job.x), dtype=torch.long)
    with pytest.raises(ConfigError, match="module by module"):
        zo_steps(job, sc.client.params, zo.Noise(job.model), [1, 2], check=True)
    job = make_job(sc, cid=0)
    res = zo_steps(job, sc.client.params, zo.Noise(job.model), [1, 2], check=True)
    assert len(res.grads) == 2


def test_a_client_whose_state_is_older_than_the_server_thinks_refuses():
    _, sc = scenario(strategy__sync="changed")
    job = make_job(sc, cid=1)
    job.config[W.BASE] = 3
    payload = job.content[W.PAYLOAD]
    payload[W.INDEX] = zo.wire_array(np.zeros(0, dtype=np.uint16))
    payload[W.ACC] = zo.wire_array(np.zeros(0, dtype=np.float32))
    with pytest.raises(RuntimeError, match="state was lost"):
        FedKSeedClient(sc.client.params, scenario=sc).fit(job)


def test_whole_model_replies_are_averaged_and_then_downloaded_once():
    _, sc = scenario()
    task = build_task(sc)
    strat = build_strategy(sc)
    strat.bind_model(task.new_model())
    view = SelectedGrid(MockGrid([11, 22]), [11, 22])
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), view))
    models = [task.new_model().state_dict() for _ in msgs]
    for i, m in enumerate(models):
        for v in m.values():
            v.fill_(float(i))
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord(m), "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=msg,
        )
        for m, msg in zip(models, msgs, strict=True)
    ]
    arrays, _ = strat.aggregate_train(1, replies)
    assert all(np.allclose(a, 0.5) for a in arrays.to_numpy_ndarrays())
    again = list(strat.configure_train(2, arrays, ConfigRecord(), view))
    assert all("arrays" in m.content for m in again)
    job = make_job(sc, cid=0)
    job.content = again[0].content
    job.config = dict(again[0].content["config"].items())
    client = FedKSeedClient(sc.client.params, scenario=sc)
    client.load_global(job.model, job.content)
    client.fit(job)
    stored = job.state.get(STATE_MODEL).to_torch_state_dict()
    assert all(torch.all(v == 0.5) for v in stored.values())


def test_zo_sgd_with_fedavg_sends_whole_models():
    rows, driver, _, _ = run(client__name="zo_sgd", strategy__name="fedavg", strategy__k=None)
    size = sum(v.numel() * 4 for v in driver.model.state_dict().values())
    assert all(pc["bytes_up"] > size for pc in rows[1]["per_client"].values())
    assert rows[-1]["central_loss"] < rows[0]["central_loss"]


@pytest.mark.slow
def test_ray_engine_replays_the_inline_run(tmp_path):
    import fedopt

    _, sc = scenario(run__clients_per_round=2)
    rows, *_ = run(run_key=f"0-{sc.fingerprint()}", run__clients_per_round=2)
    result = fedopt.run(sc, out=tmp_path)
    assert result.summary["status"] == "completed"
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in result.rows] == strip
