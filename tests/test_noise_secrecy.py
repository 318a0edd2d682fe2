"""Secret DP noise: the seed-replay attack, where the key lives, and what a DP reply releases."""

from __future__ import annotations

import base64
import pickle

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from inline import (
    InlineGrid,
    noise_keys_for,
    run_inline,
    scenario_with,
    set_task_identity,
    strip_wall,
)

from clients.dpsgd import DPSGDClient
from fedopt import clientapp
from fedopt.checkpoint import latest_checkpoint
from fedopt.client import ClientJob, ClientState
from fedopt.clientapp import make_client_app
from fedopt.errors import ConfigError
from fedopt.privacy.plan import DPSGDParams
from fedopt.privacy.secrecy import NoiseKey, wants_secret
from fedopt.registry import load_builtins
from fedopt.simulation import execute_run, run_noise_key, write_scenario
from fedopt.task import build_task, derive_seed

load_builtins()

SIGMA, C, LR = 50.0, 1.0, 0.1
RAW = {
    "name": "secrecy",
    "data": {"name": "blobs", "num_examples": 400, "num_features": 8},
    "partition": {"num_clients": 4, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {
        "name": "dpsgd",
        "batch_size": 16,
        "lr": LR,
        "steps": 1,
        "noise_multiplier": SIGMA,
        "max_grad_norm": C,
    },
    "run": {"rounds": 2, "seed": 3},
}


def flat(arrays):
    return np.concatenate([a.ravel() for a in arrays.to_numpy_ndarrays()])


def released_update(scenario, key):
    """Client 0's reply in round 1, as the server receives it, minus the model it was sent."""
    set_task_identity()
    clientapp._RESIDENT = clientapp._ResidentRuntime()
    task = build_task(scenario)
    raw = scenario.to_dict()
    app = make_client_app(lambda ctx: {"": raw}, noise_keys={"": key} if key else None)
    start = ArrayRecord(task.new_model().state_dict())
    cfg = ConfigRecord({"cid": 0, "server-round": 1})
    ctx = Context(1, 5, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    msg = Message(
        RecordDict({"arrays": start, "config": cfg}), dst_node_id=5, message_type=MessageType.TRAIN
    )
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    return task, start, flat(reply.content["arrays"]) - flat(start), reply.content["metrics"]


def replay_attack(scenario, task, start):
    """The server's attack: rerun client 0's round-1 step on fake data with the scenario's seed.

    The Poisson masks depend only on n (public) and the seed; the noise only on
    the seed. Subtracting the fake update cancels the noise exactly when the
    seed is the one the client used, leaving the difference of two clipped sums.
    """
    n = len(task.client_data(0)[0])
    model = task.new_model()
    model.load_state_dict(start.to_torch_state_dict())
    gen = torch.Generator().manual_seed(derive_seed(scenario.run.seed, 1, 0, 1))
    x = torch.zeros((n, *task.input_shape))
    job = ClientJob(
        cid=0,
        server_round=1,
        model=model,
        x=x,
        y=torch.zeros(n, dtype=torch.long),
        config={},
        content=RecordDict(),
        state=ClientState(RecordDict(), 0),
        generator=gen,
        device=torch.device("cpu"),
    )
    fake = DPSGDClient(scenario.client.params, scenario=scenario).fit(job)
    return flat(fake.arrays) - flat(start), n


def test_replayable_noise_is_recovered_from_the_seed_and_secret_noise_is_not():
    replay = scenario_with(RAW, client__noise="replayable")
    task, start, real, _ = released_update(replay, None)
    fake, n = replay_attack(replay, task, start)
    residual = np.linalg.norm(real - fake)
    batch = int(n * (1 / np.ceil(n / 16)))  # Opacus divides the noisy sum by q·n
    # the noise cancels: what is left is lr·(S_real - S_fake)/(q·n), each ||S|| <= n·C
    assert residual <= LR * 2 * n * C / batch
    assert residual < 0.05 * np.linalg.norm(real)  # the noise dominated the release

    secret = scenario_with(RAW)
    assert secret.client.params.noise == "secret" and wants_secret(secret)
    task, start, real, _ = released_update(secret, NoiseKey.new())
    fake, _ = replay_attack(secret, task, start)
    # independent noise on both sides: the difference is ~sqrt(2) times the release
    assert np.linalg.norm(real - fake) > 1.2 * np.linalg.norm(real)


def test_a_secret_run_is_reproducible_only_with_its_key():
    sc = scenario_with(RAW)
    key = NoiseKey.new()
    a = released_update(sc, key)[2]
    b = released_update(sc, NoiseKey(key.to_bytes()))[2]
    c = released_update(sc, NoiseKey.new())[2]
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_noise_key_derivation_and_hiding():
    key = NoiseKey(bytes(range(32)))
    assert key.seed(1, 2, 3) == NoiseKey(bytes(range(32))).seed(1, 2, 3)
    assert key.seed(1, 2, 3) != key.seed(1, 2, 4) and 0 <= key.seed(9) < 2**63
    assert key.seed(1, 2, 3) != NoiseKey(bytes(32)).seed(1, 2, 3)
    assert "secret" in repr(key) and bytes(range(32)).hex() not in repr(key)
    assert pickle.loads(pickle.dumps(key)) == key
    assert NoiseKey.new() != NoiseKey.new()
    with pytest.raises(ValueError, match="32 bytes"):
        NoiseKey(b"short")
    with pytest.raises(
        ConfigError, match='noise = .loud. is not allowed: "secret" or "replayable"'
    ):
        DPSGDParams(noise="loud")


def test_a_dp_reply_carries_only_the_update_count_and_ledger_by_default():
    sc = scenario_with(RAW, client__steps=3)
    _, _, _, m = released_update(sc, NoiseKey.new())
    assert "train_loss" not in m and "train_accuracy" not in m
    n = int(m["num-examples"])
    # work is the public expected batch q·n times the steps, not the examples sampled
    assert m["work"] == pytest.approx(3 * n / np.ceil(n / 16), rel=1e-15)
    ledger = {"dp_sigma", "dp_q", "dp_delta", "dp_steps", "dp_steps_total", "dp_exhausted"}
    reserved = {"num-examples", "cid", "work", "cuda", "steps", "epsilon"}
    assert set(m) == ledger | reserved

    opted = scenario_with(RAW, client__steps=3, client__release_train_metrics=True)
    _, _, _, m = released_update(opted, NoiseKey.new())
    assert set(m) == ledger | reserved | {"train_loss", "train_accuracy", "examples_sampled"}
    assert m["work"] == pytest.approx(3 * n / np.ceil(n / 16), rel=1e-15)  # still the public one
    assert m["examples_sampled"] == int(m["examples_sampled"]) >= 0


def run_files(tmp_path, scenario, key):
    set_task_identity()
    clientapp._RESIDENT = clientapp._ResidentRuntime()
    task = build_task(scenario)
    raw = scenario.to_dict()
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}, noise_keys={"": key}), 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_scenario(run_dir, scenario)
    execute_run(grid, task, run_dir, noise_key=key)
    return run_dir


def test_the_key_is_in_the_checkpoints_and_nowhere_else_in_the_run_directory(tmp_path):
    sc = scenario_with(RAW, run__checkpoint_every=1)
    key = NoiseKey.new()
    run_dir = run_files(tmp_path, sc, key)
    raw = key.to_bytes()
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), str(list(raw)).encode()]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    outside = [p for p in files if "checkpoints" not in p.parts]
    assert {p.name for p in outside} >= {"scenario.toml", "metrics.jsonl", "summary.json"}
    for path in outside:
        data = path.read_bytes()
        assert not any(f in data for f in forms), path
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and run_noise_key(sc, ckpt) == key
    assert (ckpt.path.stat().st_mode & 0o077) == 0  # the checkpoint is readable by its owner only


def test_a_secret_run_cannot_resume_from_a_checkpoint_without_its_key(tmp_path):
    sc = scenario_with(RAW, client__noise="replayable", run__checkpoint_every=1)
    run_dir = run_files(tmp_path, sc, None)
    ckpt = latest_checkpoint(run_dir)
    assert "noise_key" not in ckpt.payload and run_noise_key(sc, ckpt) is None
    with pytest.raises(ConfigError, match="a checkpoint written by a secret run"):
        run_noise_key(scenario_with(RAW), ckpt)


def test_inline_secret_runs_share_the_drivers_key_with_the_clients():
    sc = scenario_with(RAW)
    key, keys = noise_keys_for(sc)
    assert keys == {"": key}
    rows_a, driver, _ = run_inline(sc)
    rows_b, _, _ = run_inline(sc)
    rows_c, _, _ = run_inline(sc, noise_key=NoiseKey.new())
    assert driver.noise_key == key
    assert strip_wall(rows_a) == strip_wall(rows_b)
    assert strip_wall(rows_a) != strip_wall(rows_c)
