"""FedSVD, FFA-LoRA and FedAvg-LoRA: the LoRA client, the server's aggregation, whole runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from inline import run_inline, scenario_with, set_task_identity, strip_wall
from opacus.accountants import RDPAccountant

from clients.fedsvd import LoraClient
from fedopt.client import ClientJob, ClientState
from fedopt.errors import ConfigError, RunError
from fedopt.lora import adapter_pairs, factor_of, merge_adapters
from fedopt.records import ByteCounter, SelectedGrid
from fedopt.registry import STRATEGIES, load_builtins
from fedopt.task import as_tensors, build_task

load_builtins()

RAW = {
    "name": "fedsvd",
    "data": {"name": "digits"},
    "partition": {"name": "iid", "num_clients": 4, "test_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [256]},
    "client": {
        "name": "lora_dpsgd",
        "batch_size": 32,
        "lr": 0.5,
        "max_grad_norm": 1.0,
        "target_epsilon": 6.0,
        "lora_rank": 4,
    },
    "strategy": {"name": "fedsvd"},
    "run": {"rounds": 6, "seed": 1, "fed_eval_every": 3},
}
CPU = torch.device("cpu")
FACTORS = ("lora_A", "lora_B")


@pytest.fixture(autouse=True)
def _identity():
    set_task_identity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a client worker runs (run.num_cpus = 1)
    yield
    torch.set_num_threads(threads)


def keys_of(arrays, factor=None):
    return {k for k in arrays.keys() if factor_of(k) is not None and factor in (None, factor_of(k))}


# -- the client -----------------------------------------------------------------------------


def fit_once(strategy="fedsvd", server_round=1, state=None, **client):
    s = scenario_with(
        RAW, strategy__name=strategy, **{f"client__{k}": v for k, v in client.items()}
    )
    return fit_scenario(s, server_round=server_round, state=state)


def fit_scenario(s, *, server_round=1, state=None):
    task = build_task(s)
    model = task.new_model()
    train, _ = task.client_data(0)
    x, y = as_tensors(train, CPU)
    job = ClientJob(
        cid=0,
        server_round=server_round,
        model=model,
        x=x,
        y=y,
        config={"server-round": server_round},
        content=RecordDict(),
        state=state or ClientState(RecordDict(), 0),
        generator=torch.Generator().manual_seed(server_round),
        device=CPU,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = LoraClient(s.client.params, scenario=s).fit(job)
    return before, model, update


def test_fedsvd_client_trains_b_only_a_and_base_get_no_update_and_no_noise():
    before, model, update = fit_once()
    after = model.state_dict()
    b_keys = {k for k in after if factor_of(k) == "lora_B"}
    assert set(update.arrays.keys()) == b_keys  # only ΔB travels
    for key, value in after.items():
        changed = not torch.equal(before[key], value)
        assert changed == (key in b_keys), key  # A and the base stay bitwise the same
    for name, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == (factor_of(name) == "lora_B")
    for key in b_keys:  # B started at 0, so ΔB is the trained B
        np.testing.assert_array_equal(update.arrays[key].numpy(), after[key].numpy())
    assert update.metrics["dp_steps"] > 0 and 0 < update.metrics["epsilon"] <= 6.0


def test_fedavg_lora_client_trains_and_sends_both_factors():
    before, model, update = fit_once("fedavg_lora")
    after = model.state_dict()
    adapters = {k for k in after if factor_of(k)}
    assert set(update.arrays.keys()) == adapters
    for key in adapters:
        delta = after[key] - before[key]
        assert delta.abs().max() > 0
        np.testing.assert_array_equal(update.arrays[key].numpy(), delta.numpy())


def test_dp_noise_reaches_b_and_epsilon_composes_across_rounds():
    state = ClientState(RecordDict(), 0)
    _, _, noisy = fit_once(noise_multiplier=1.0, state=state)
    _, _, clean = fit_once(non_private=True, target_epsilon=None)
    key = next(iter(noisy.arrays.keys()))
    assert not np.allclose(noisy.arrays[key].numpy(), clean.arrays[key].numpy())
    _, _, third = fit_once(noise_multiplier=1.0, server_round=3, state=state)
    tau, q = int(third.metrics["dp_steps"]), float(third.metrics["dp_q"])
    acc = RDPAccountant()
    acc.history = [(1.0, q, 2 * tau)]
    assert third.metrics["dp_steps_total"] == 2 * tau
    assert third.metrics["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


def test_expected_participations_calibrate_the_lora_client_as_the_pre_run_check():
    from fedopt.privacy.calibration import calibrate_noise
    from fedopt.privacy.plan import sigma_request

    # 6 rounds of 2 of 4 clients: ceil(6·2/4) = 3 expected participations, not 6.
    s = scenario_with(RAW, client__max_participations="expected", run__clients_per_round=2)
    client = LoraClient(s.client.params, scenario=s)
    assert client.params.max_participations == 3
    _, _, update = fit_scenario(s)
    q, tau = float(update.metrics["dp_q"]), int(update.metrics["dp_steps"])
    plan = {"delta": 1e-5, "sample_rate": q, "accountant": "rdp", "target_epsilon": 6.0}
    assert update.metrics["dp_sigma"] == calibrate_noise(**plan, steps=3 * tau)
    every = sigma_request(
        s.client.params,
        sample_rate=q,
        local_steps=tau,
        rounds=6,
        **{"clients_per_round": 4, "num_clients": 4},
    )
    assert every["steps"] == 6 * tau and calibrate_noise(**every) > update.metrics["dp_sigma"]
    acc = RDPAccountant()
    acc.history = [(update.metrics["dp_sigma"], q, 3 * tau)]
    assert 6.0 - 0.01 <= acc.get_epsilon(delta=1e-5) <= 6.0  # three rounds spend the budget


# -- the server -----------------------------------------------------------------------------


class MockGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def server_setup(name, **params):
    s = scenario_with(RAW, strategy__name=name, **{f"strategy__{k}": v for k, v in params.items()})
    strategy = STRATEGIES.get(name).obj(s.strategy.params, scenario=s)
    model = build_task(s).new_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if factor_of(key) == "lora_B":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return strategy, ArrayRecord(model.state_dict())


def deltas(messages, arrays, factors, weights, seed=1):
    g = np.random.default_rng(seed)
    out, sent = [], []
    for msg, n in zip(messages, weights, strict=True):
        d = {
            k: g.normal(size=arrays[k].shape).astype(np.float32)
            for k in arrays.keys()
            if factor_of(k) in factors
        }
        sent.append(d)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in d.items()}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        out.append(Message(content, reply_to=msg))
    mean = {k: sum(w * s[k] for w, s in zip(weights, sent, strict=True)) / sum(weights) for k in d}
    return out, mean


def one_round(strategy, arrays, factors, server_round=1, weights=(10, 30, 20)):
    view = SelectedGrid(MockGrid([1, 2, 3, 4]), [1, 2, 3])
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), view))
    replies, mean = deltas(msgs, arrays, factors, weights, seed=server_round)
    new, metrics = strategy.aggregate_train(server_round, replies)
    return msgs, new, mean, metrics


def test_fedsvd_server_refactorizes_the_mean_of_b_times_a():
    strategy, arrays = server_setup("fedsvd")
    msgs, new, mean, metrics = one_round(strategy, arrays, {"lora_B"})
    assert all(set(m.content["arrays"].keys()) == keys_of(arrays) for m in msgs)
    assert list(new.keys()) == list(arrays.keys()) and metrics["lora_svd"] == 1
    for key in arrays.keys():
        if factor_of(key) is None:  # the frozen base comes back untouched
            np.testing.assert_array_equal(new[key].numpy(), arrays[key].numpy())
    for a_key, b_key in adapter_pairs(arrays.keys()).values():
        a_old = arrays[a_key].numpy().astype(np.float64)
        b_bar = arrays[b_key].numpy().astype(np.float64) + mean[b_key]
        a_new, b_new = new[a_key].numpy(), new[b_key].numpy()
        assert a_new.dtype == b_new.dtype == np.float32
        np.testing.assert_allclose(a_new @ a_new.T, np.eye(len(a_new)), atol=1e-5)
        np.testing.assert_allclose(b_new @ a_new, b_bar @ a_old, atol=1e-5)
        assert not np.allclose(a_new, a_old)


def test_svd_every_n_rounds_moves_a_only_on_those_rounds():
    strategy, arrays = server_setup("fedsvd", svd_every=2)
    _, first, _, m1 = one_round(strategy, arrays, {"lora_B"}, server_round=1)
    _, second, _, m2 = one_round(strategy, first, {"lora_B"}, server_round=2)
    a_keys = keys_of(arrays, "lora_A")
    assert m1["lora_svd"] == 0 and m2["lora_svd"] == 1
    assert all(np.array_equal(first[k].numpy(), arrays[k].numpy()) for k in a_keys)
    for k in a_keys:
        a = second[k].numpy()
        np.testing.assert_allclose(a @ a.T, np.eye(len(a)), atol=1e-5)
    assert strategy.summary_extra()["lora"]["refactorizations"] == 1


def test_ffa_lora_sends_only_b_and_keeps_a_at_its_initialisation():
    strategy, arrays = server_setup("ffa_lora")
    msgs, new, mean, metrics = one_round(strategy, arrays, {"lora_B"})
    assert all(set(m.content["arrays"].keys()) == keys_of(arrays, "lora_B") for m in msgs)
    assert metrics["lora_svd"] == 0
    for key in arrays.keys():
        expected = arrays[key].numpy().astype(np.float64) + mean.get(key, 0.0)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-6, atol=1e-7)
        if factor_of(key) != "lora_B":
            np.testing.assert_array_equal(new[key].numpy(), arrays[key].numpy())


def test_fedavg_lora_averages_a_and_b_separately():
    strategy, arrays = server_setup("fedavg_lora")
    msgs, new, mean, metrics = one_round(strategy, arrays, {"lora_A", "lora_B"})
    assert all(set(m.content["arrays"].keys()) == keys_of(arrays) for m in msgs)
    assert set(mean) == keys_of(arrays)
    for key in mean:
        expected = arrays[key].numpy().astype(np.float64) + mean[key]
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    sq = {f: sum(float((mean[k] ** 2).sum()) for k in keys_of(arrays, f)) for f in FACTORS}
    assert metrics["lora_b_delta_norm"] == pytest.approx(np.sqrt(sq["lora_B"]), rel=1e-6)
    whole = np.sqrt(sq["lora_A"] + sq["lora_B"])
    assert metrics["lora_delta_norm"] == pytest.approx(whole, rel=1e-6)  # float32 sums


def test_a_client_sending_a_factor_it_must_not_train_is_an_error():
    strategy, arrays = server_setup("fedsvd")
    view = SelectedGrid(MockGrid([1]), [1])
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), view))
    replies, _ = deltas(msgs, arrays, {"lora_A", "lora_B"}, [5])
    with pytest.raises(RunError, match="must not train"):
        strategy.aggregate_train(1, replies)


# -- whole runs ---------------------------------------------------------------------------------


def run(scenario):
    rows, driver, grid = run_inline(scenario)
    return rows, driver, grid, driver.task


@pytest.mark.parametrize(
    ("name", "down", "up"),
    [
        ("fedsvd", {"lora_A", "lora_B"}, {"lora_B"}),
        ("ffa_lora", {"lora_B"}, {"lora_B"}),
        ("fedavg_lora", {"lora_A", "lora_B"}, {"lora_A", "lora_B"}),
    ],
)
def test_only_adapter_arrays_travel_and_the_bytes_show_it(name, down, up):
    s = scenario_with(RAW, strategy__name=name, run__rounds=2, run__fed_eval_every=1)
    rows, driver, grid, task = run(s)
    full = ArrayRecord(task.new_model().state_dict())
    adapters = {f: keys_of(full, f) for f in ("lora_A", "lora_B")}
    expect_down = set().union(*(adapters[f] for f in down))
    expect_up = set().union(*(adapters[f] for f in up))
    assert len(grid.sent) == 2 * (4 + 4)  # train and evaluate, 4 clients, 2 rounds
    assert all(set(m.content["arrays"].keys()) == expect_down for m in grid.sent)
    trained = [r for r in grid.received if r.metadata.message_type == MessageType.TRAIN]
    assert len(trained) == 8 and all(set(r.content["arrays"].keys()) == expect_up for r in trained)
    evaluated = [r for r in grid.received if r.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluated) == 8 and all("arrays" not in r.content for r in evaluated)
    counter = ByteCounter()
    model_bytes = counter.record_size("arrays", full)
    down_bytes = counter.record_size("arrays", ArrayRecord({k: full[k] for k in expect_down}))
    for row in rows[1:]:
        for stats in row["per_client"].values():
            assert down_bytes < stats["bytes_down"] < down_bytes + 200  # + the config record
            assert stats["bytes_down"] < model_bytes / 4
    summary = driver.summary_extra()["lora"]
    assert summary["method"] == name and summary["layers"] == 2


def test_private_fedsvd_learns_and_its_adapters_change_the_model():
    s = scenario_with(RAW)
    rows, driver, _, task = run(s)
    assert rows[-1]["epsilon_max"] <= 6.0
    assert rows[-1]["central_accuracy"] > max(0.5, rows[0]["central_accuracy"] + 0.2)
    x, _ = as_tensors(task.data.test, CPU)
    base = task.new_model().eval()  # B = 0: the base model's output
    trained = driver.model.eval()  # the server's model: base + current adapters
    with torch.no_grad():
        assert (trained(x) - base(x)).abs().max() > 0.1
        merged = base.state_dict()
        for name, w in merge_adapters(trained).items():
            layer = name.rsplit(".", 1)[0]
            merged[f"{layer}.base_layer.weight"] = w
        plain = task.new_model().eval()
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(x), trained(x), atol=1e-4, rtol=1e-4)


def test_same_scenario_replays_bitwise():
    s = scenario_with(RAW, run__rounds=2)
    assert strip_wall(run(s)[0]) == strip_wall(run(s)[0])


# -- configuration ------------------------------------------------------------------------------


def test_lora_client_needs_a_lora_strategy_and_back():
    with pytest.raises(ConfigError) as err:
        scenario_with(RAW, strategy__name="fedavg")
    assert err.value.key == "strategy.name" and "fedsvd" in str(err.value)
    raw = {**RAW, "client": {"name": "sgd"}}
    with pytest.raises(ConfigError) as err:
        scenario_with(raw)
    assert err.value.key == "client.name" and "lora_dpsgd" in str(err.value)


def test_unknown_lora_target_lists_the_linear_layers():
    with pytest.raises(ConfigError) as err:
        build_task(scenario_with(RAW, client__lora_targets=["q_proj"]))
    assert err.value.key == "client.lora_targets" and "1, 3" in str(err.value)


def test_user_level_dp_is_refused():
    raw = {**RAW, "user_dp": {"noise_multiplier": 1.0, "clipping_norm": 1.0}}
    with pytest.raises(ConfigError) as err:
        scenario_with(raw)
    assert err.value.key == "user_dp"


@pytest.mark.slow
def test_mlp_scenario_runs_on_ray_and_sends_only_adapters(tmp_path):
    from pathlib import Path

    from fedopt.simulation import run as run_on_ray

    path = Path(__file__).resolve().parents[1] / "scenarios" / "fedsvd_mlp.toml"
    result = run_on_ray(path, sets=["run.rounds=2", "run.fed_eval_every=2"], out=tmp_path)
    s = result.summary
    assert s["status"] == "completed" and s["lora"]["method"] == "fedsvd"
    assert s["lora"]["refactorizations"] == 2 and s["lora"]["layers"] == 2
    adapters = sum(s["lora"]["adapter_params"].values())
    assert adapters < s["lora"]["model_params"] / 3
    # per client and round: A and B down (float32), ΔB up, plus keys, config and metrics
    b = s["lora"]["adapter_params"]["lora_B"]
    first = result.rows[1]["per_client"]
    assert all(4 * adapters < c["bytes_down"] < 4 * adapters + 1024 for c in first.values())
    assert all(4 * b < c["bytes_up"] < 4 * b + 1024 for c in first.values())
    full_model = 4 * s["lora"]["model_params"]  # float32 bytes of base + adapters
    assert all(c["bytes_down"] < full_model / 4 for c in first.values())
