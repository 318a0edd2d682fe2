"""A pack trained batched (torch.func) matches client-by-client training to float rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from inline import run_inline, scenario_with, strip_wall
from torch import nn

from fedopt import vectorized
from fedopt.training import LocalTrainConfig, train_local


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_batched_clients_match_sequential_training(mu):
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = [0, 7, 33, 64, 40, 21, 30]
    cfgs = [
        LocalTrainConfig(epochs=2, batch_size=16, lr=0.1),
        LocalTrainConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=0.01),
        LocalTrainConfig(steps=5, batch_size=8, lr=0.1),
        LocalTrainConfig(epochs=1, batch_size=16, lr=0.2),
        LocalTrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9),
        LocalTrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.5, max_grad_norm=0.5),
        LocalTrainConfig(steps=6, batch_size=4, lr=0.3, max_grad_norm=0.05, weight_decay=0.01),
    ]
    jobs = []
    expected = []
    for c, (n, cfg) in enumerate(zip(sizes, cfgs, strict=True)):
        x, y = data(n, c)
        jobs.append(
            vectorized.PackJob(x, y, cfg, torch.Generator().manual_seed(c), start, proximal_mu=mu)
        )
        ref = mlp()
        ref.load_state_dict(start)
        gen = torch.Generator().manual_seed(c)
        res = train_local(ref, x, y, cfg, generator=gen, proximal_mu=mu)
        expected.append((ref.state_dict(), res))
    got = vectorized.train_pack(mlp(), jobs)
    for (w, res), (w_ref, res_ref) in zip(got, expected, strict=True):
        assert (res.steps, res.examples_processed, res.num_examples) == (
            res_ref.steps,
            res_ref.examples_processed,
            res_ref.num_examples,
        )
        for k, v in w_ref.items():
            np.testing.assert_allclose(w[k].numpy(), v.numpy(), rtol=0, atol=2e-6)
        if res_ref.num_examples:
            assert res.loss == pytest.approx(res_ref.loss, rel=1e-5)
            assert res.accuracy == res_ref.accuracy
        else:
            assert math.isnan(res.loss) and res.steps == 0


def test_what_cannot_be_batched_says_why():
    cfg = LocalTrainConfig()
    assert vectorized.unsupported(mlp(), cfg) is None
    assert vectorized.unsupported(mlp(), LocalTrainConfig(momentum=0.9, max_grad_norm=1.0)) is None
    assert "SGD" in vectorized.unsupported(mlp(), LocalTrainConfig(optimizer="adam"))
    assert "buffers" in vectorized.unsupported(nn.Sequential(nn.BatchNorm1d(3)), cfg)
    assert "dropout" in vectorized.unsupported(nn.Sequential(nn.Dropout(0.1)), cfg)


RAW = {
    "name": "vec",
    "data": {"name": "blobs", "num_examples": 480, "num_features": 8},
    "partition": {"name": "dirichlet", "num_clients": 8, "test_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"name": "sgd", "epochs": 2, "batch_size": 8, "lr": 0.1},
    "run": {"rounds": 3, "seed": 1, "pack": "on", "pack_nodes": 2},
}


def test_a_vectorized_run_gives_the_same_rows_to_float_rounding(monkeypatch):
    calls = []
    real = vectorized.train_pack
    monkeypatch.setattr(vectorized, "train_pack", lambda m, j: calls.append(len(j)) or real(m, j))
    plain, _, _ = run_inline(scenario_with(RAW))
    assert not calls
    fast, _, _ = run_inline(scenario_with(RAW, run__vectorize=True))
    assert sum(calls) == 3 * 8  # every client of every round trained batched
    for a, b in zip(plain, fast, strict=True):
        assert a["clients"] == b["clients"] if "clients" in a else True
        for key in ("central_accuracy", "fed_accuracy", "train_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6)
        assert b["central_loss"] == pytest.approx(a["central_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        LocalTrainConfig(epochs=1, batch_size=16, lr=0.1),
        LocalTrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, max_grad_norm=0.5),
    ],
    ids=["sgd", "momentum-clipped"],
)
def test_a_clients_batched_result_does_not_depend_on_its_pack_mates(cfg):
    start = {k: v.clone() for k, v in mlp().state_dict().items()}

    def job(c):
        x, y = data(20 + 3 * c, c)
        return vectorized.PackJob(x, y, cfg, torch.Generator().manual_seed(c), start)

    alone = vectorized.train_pack(mlp(), [job(1)])[0]
    for mates in ([0, 1], [1, 2, 3, 4, 5], list(range(12))):
        got = vectorized.train_pack(mlp(), [job(c) for c in mates])[mates.index(1)]
        assert got[1] == alone[1]
        assert all(torch.equal(got[0][k], alone[0][k]) for k in alone[0])


def test_a_vectorized_run_does_not_depend_on_the_number_of_nodes():
    raw = {**RAW, "client": {**RAW["client"], "momentum": 0.9, "max_grad_norm": 1.0}}
    rows = [
        strip_wall(run_inline(scenario_with(raw, run__vectorize=True, run__pack_nodes=n))[0])
        for n in (1, 2, 3)
    ]
    assert rows[0] == rows[1] == rows[2]
