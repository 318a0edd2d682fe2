"""Packed virtual clients give the same results as one node per client, for every method."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from inline import method_raw, run_inline, scenario_with, strip_wall

from fedopt import transport
from fedopt.config import parse_scenario
from fedopt.registry import CLIENTS, STRATEGIES, load_builtins

load_builtins()

RAW = {
    "name": "packing",
    "data": {"name": "blobs", "num_examples": 420, "num_features": 8},
    "partition": {"name": "dirichlet", "num_clients": 7, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 1, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 2, "seed": 5, "clients_per_round": 5, "fed_eval_clients": 4},
}


def both(raw):
    """Rows of ``raw`` unpacked, and packed on 3 nodes (and the packed grid)."""
    off, _, _ = run_inline(scenario_with(raw, run__pack="off"))
    on, driver, grid = run_inline(scenario_with(raw, run__pack="on", run__pack_nodes=3))
    assert driver.layout.packed and len(driver.transport.nodes) == 3
    return off, on, grid


CASES = [("strategy", n) for n in STRATEGIES.names()] + [("client", n) for n in CLIENTS.names()]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_strategy_and_client_is_bitwise_the_same_packed(kind, name):
    raw = method_raw(RAW, kind, name)
    if "clients_per_round" not in raw["run"]:
        raw["run"] = {**raw["run"], "rounds": 4}
    off, on, grid = both(raw)
    assert strip_wall(off) == strip_wall(on)
    assert len(off) > 1


@pytest.mark.parametrize(
    "section",
    [
        {"curriculum": {"ordering": "curriculum"}},
        {"faults": {"client_error": 0.3}},
        {"user_dp": {"noise_multiplier": 0.5, "clipping_norm": 1.0}},
    ],
    ids=["curriculum", "faults", "user_dp"],
)
def test_sections_are_bitwise_the_same_packed(section):
    off, on, _ = both({**RAW, **section})
    assert strip_wall(off) == strip_wall(on)


def test_a_round_sends_one_message_per_node():
    _, on, grid = both(RAW)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == sum(r["num_clients"] for r in on[1:])  # per client, as sent
    assert grid.pushed <= 2 * (3 + 3) + 1  # per round: <= 3 train + <= 3 evaluate messages


def test_pack_content_carries_a_shared_record_once():
    shared = ArrayRecord([np.zeros(3, dtype=np.float32)])
    contents = {
        c: RecordDict({"arrays": shared, "config": ConfigRecord({"cid": c})}) for c in (4, 9)
    }
    packed = transport.pack_content(contents)
    assert sum(isinstance(v, ArrayRecord) for v in packed.values()) == 1
    back = transport.unpack_content(packed)
    assert list(back) == [4, 9] and back[9]["config"]["cid"] == 9
    assert back[4]["arrays"] is shared


def test_auto_packs_only_when_there_are_more_clients_than_nodes():
    sc = parse_scenario({**RAW, "run": {**RAW["run"], "pack_nodes": 3}})
    assert transport.pack_plan(sc, num_clients=7) == transport.PackPlan(
        packed=True, nodes=3, groups=64
    )
    assert transport.pack_plan(sc, num_clients=3) == transport.PackPlan(
        packed=False, nodes=3, groups=64
    )
    crash = parse_scenario({**RAW, "faults": {"worker_crash": 0.1}})
    assert not transport.pack_plan(crash, num_clients=7).packed
    off = sc.replace(**{"run.pack": "off"})
    assert transport.pack_plan(off, num_clients=7) == transport.PackPlan(
        packed=False, nodes=7, groups=64
    )
