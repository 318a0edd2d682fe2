import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedopt.errors import ConfigError
from fedopt.models import MlpParams, build_model
from fedopt.params import build
from fedopt.registry import NoParams
from fedopt.training import (
    LR_SCHEDULES,
    EvalResult,
    LocalTrainConfig,
    evaluate,
    get_weights,
    load_weights_,
    train_local,
)


def blobs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(0.0, 0.5, (n, 2))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def make_model(seed=0, name="mlp", params=None):
    params = MlpParams(hidden=(8,)) if params is None else params
    return build_model(name, params, input_shape=(2,), num_classes=3, seed=seed)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def weights_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_exact_step_and_example_counts():
    x, y = blobs(100)
    res = train_local(
        make_model(), x, y, LocalTrainConfig(epochs=2, batch_size=32), generator=gen(0)
    )
    assert (res.steps, res.examples_processed, res.num_examples) == (8, 200, 100)
    res = train_local(
        make_model(), x, y, LocalTrainConfig(steps=7, batch_size=32), generator=gen(0)
    )
    # a pass is 32 + 32 + 32 + 4; seven steps are one pass plus three full batches
    assert (res.steps, res.examples_processed, res.num_examples) == (7, 196, 100)


def test_steps_override_epochs():
    x, y = blobs(10)
    cfg = LocalTrainConfig(epochs=5, steps=3, batch_size=4)
    res = train_local(make_model(), x, y, cfg, generator=gen(0))
    assert (res.steps, res.examples_processed) == (3, 4 + 4 + 2)


def test_loss_decreases_on_blobs():
    x, y = blobs(120)
    model = make_model()
    before = evaluate(model, x, y)
    cfg = LocalTrainConfig(epochs=5, batch_size=16, lr=0.1)
    first = train_local(model, x, y, cfg, generator=gen(1))
    second = train_local(model, x, y, cfg, generator=gen(2))
    after = evaluate(model, x, y)
    assert after.loss < before.loss / 4
    assert second.loss < first.loss
    assert after.accuracy >= 0.95


def test_one_full_batch_sgd_step_matches_formula():
    x, y = blobs(20)
    model = make_model(name="logreg", params=NoParams())
    w0 = get_weights(model)
    W = torch.tensor(w0["1.weight"], requires_grad=True)
    b = torch.tensor(w0["1.bias"], requires_grad=True)
    F.cross_entropy(x @ W.T + b, y).backward()
    cfg = LocalTrainConfig(steps=1, batch_size=20, lr=0.3)
    train_local(model, x, y, cfg, generator=gen(0))
    w1 = get_weights(model)
    np.testing.assert_allclose(w1["1.weight"], (W - 0.3 * W.grad).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(w1["1.bias"], (b - 0.3 * b.grad).detach().numpy(), atol=1e-6)


def test_loss_is_example_weighted_mean_and_accuracy_on_seen_batches():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)
            self.lin.requires_grad_(False)
            self.unused = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.lin(x) + 0.0 * self.unused

    torch.manual_seed(0)
    model = Fixed()
    x, y = blobs(50)
    res = train_local(model, x, y, LocalTrainConfig(batch_size=16), generator=gen(0))
    full = evaluate(model, x, y)
    assert res.examples_processed == 50 and res.steps == 4
    assert res.loss == pytest.approx(full.loss, rel=1e-6)
    assert res.accuracy == full.accuracy


def test_bitwise_determinism_per_generator_seed():
    x, y = blobs(64)
    cfg = LocalTrainConfig(epochs=2, batch_size=8, momentum=0.9)
    out = []
    for seed in (5, 5, 6):
        model = make_model(seed=0)
        train_local(model, x, y, cfg, generator=gen(seed))
        out.append(get_weights(model))
    assert weights_equal(out[0], out[1])
    assert not weights_equal(out[0], out[2])


def test_proximal_term_pulls_toward_start():
    x, y = blobs(64)
    w0 = get_weights(make_model())
    cfg = LocalTrainConfig(epochs=3, batch_size=8, lr=0.1)

    def distance(mu):
        model = make_model()
        res = train_local(model, x, y, cfg, generator=gen(0), proximal_mu=mu)
        w = get_weights(model)
        return math.sqrt(sum(float(((w[k] - w0[k]) ** 2).sum()) for k in w)), res

    d0, _ = distance(0.0)
    d1, res = distance(5.0)
    assert d1 < 0.5 * d0
    assert math.isfinite(res.loss)


@pytest.mark.parametrize(
    "cfg",
    [
        LocalTrainConfig(momentum=0.9, weight_decay=1e-3),
        LocalTrainConfig(optimizer="adam", lr=0.01),
        LocalTrainConfig(max_grad_norm=0.5),
    ],
)
def test_optimizer_variants_train(cfg):
    x, y = blobs(64)
    model = make_model()
    w0 = get_weights(model)
    res = train_local(model, x, y, cfg, generator=gen(0))
    assert math.isfinite(res.loss) and res.steps == 2
    assert not weights_equal(w0, get_weights(model))


def test_grad_clipping_bounds_update():
    x, y = blobs(32)
    model = make_model(name="logreg", params=NoParams())
    w0 = get_weights(model)
    cfg = LocalTrainConfig(steps=1, batch_size=32, lr=1.0, max_grad_norm=1e-3)
    train_local(model, x, y, cfg, generator=gen(0))
    w1 = get_weights(model)
    step = math.sqrt(sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w0))
    assert step == pytest.approx(1e-3, rel=1e-3)


def test_non_finite_loss_stops_at_once():
    x, y = blobs(64)
    model = make_model()
    with torch.no_grad():
        model[1].weight.fill_(math.inf)
        model[1].weight[0].fill_(-math.inf)
    before = get_weights(model)
    res = train_local(model, x, y, LocalTrainConfig(epochs=3, batch_size=8), generator=gen(0))
    assert math.isnan(res.loss)
    assert (res.steps, res.examples_processed, res.num_examples) == (0, 0, 64)
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_divergence_mid_training_reports_steps_taken():
    x, y = blobs(64)
    x = x * 1e18
    model = make_model(name="logreg", params=NoParams())
    res = train_local(
        model, x, y, LocalTrainConfig(epochs=5, lr=1e10, batch_size=8), generator=gen(0)
    )
    assert math.isnan(res.loss)
    assert 1 <= res.steps < 40
    assert res.examples_processed == 8 * res.steps


def test_frozen_params_not_updated():
    x, y = blobs(64)
    model = make_model()
    model[1].requires_grad_(False)
    w0 = get_weights(model)
    train_local(model, x, y, LocalTrainConfig(epochs=2, batch_size=8), generator=gen(0))
    w1 = get_weights(model)
    assert np.array_equal(w0["1.weight"], w1["1.weight"])
    assert np.array_equal(w0["1.bias"], w1["1.bias"])
    assert not np.array_equal(w0["3.weight"], w1["3.weight"])


def test_train_mode_restored_and_empty_data():
    x, y = blobs(16)
    model = make_model().eval()
    train_local(model, x, y, LocalTrainConfig(), generator=gen(0))
    assert not model.training
    res = train_local(model, x[:0], y[:0], LocalTrainConfig(), generator=gen(0))
    assert (
        math.isnan(res.loss) and (res.num_examples, res.steps, res.examples_processed) == (0,) * 3
    )


def test_evaluate_exact_values():
    x, y = blobs(37)
    model = make_model()
    logits = model(x).detach()
    expected_loss = float(F.cross_entropy(logits, y, reduction="sum")) / 37
    expected_acc = int((logits.argmax(1) == y).sum()) / 37
    res = evaluate(model, x, y, batch_size=10)
    assert res.num_examples == 37
    assert res.loss == pytest.approx(expected_loss, rel=1e-6)
    assert res.accuracy == expected_acc
    assert model.training
    model.eval()
    evaluate(model, x, y)
    assert not model.training
    empty = evaluate(model, x[:0], y[:0])
    assert math.isnan(empty.loss) and math.isnan(empty.accuracy) and empty.num_examples == 0
    assert isinstance(empty, EvalResult)


def test_load_weights_in_place_and_get_weights_copies():
    src, dst = make_model(seed=1), make_model(seed=2)
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    w = get_weights(src)
    assert list(w) == list(src.state_dict())
    load_weights_(dst, w)
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == ptrs
    assert weights_equal(get_weights(dst), w)
    w["1.weight"][:] = 7.0
    assert not np.array_equal(get_weights(dst)["1.weight"], w["1.weight"])
    load_weights_(dst, {k: torch.zeros_like(v) for k, v in dst.state_dict().items()})
    assert all(float(v.abs().sum()) == 0.0 for v in dst.state_dict().values())
    readonly = get_weights(src)
    for a in readonly.values():
        a.flags.writeable = False
    load_weights_(dst, readonly)
    assert weights_equal(get_weights(dst), get_weights(src))


def test_load_weights_errors_name_keys():
    model = make_model()
    w = get_weights(model)
    missing = {k: v for k, v in w.items() if k != "3.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['3.bias'\]"):
        load_weights_(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        load_weights_(model, {**w, "extra": np.zeros(1)})
    bad = dict(w, **{"1.weight": np.zeros((3, 3), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(3, 3\)"):
        load_weights_(model, bad)
    assert weights_equal(get_weights(model), w)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("steps", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", math.inf),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1.0),
        ("max_grad_norm", 0.0),
        ("optimizer", "sgdd"),
        ("lr_schedule", "inverse_powr"),
        ("lr_decay", -0.001),
        ("lr_power", math.inf),
    ],
)
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ConfigError) as info:
        build(LocalTrainConfig, {field: value}, "client")
    assert info.value.key == f"client.{field}"
    assert info.value.value == value
    if field == "optimizer":
        assert "adam, sgd" in info.value.allowed and "did you mean 'sgd'" in info.value.allowed
    if field == "lr_schedule":
        assert "constant, inverse_power" in info.value.allowed
        assert "did you mean 'inverse_power'" in info.value.allowed


def test_config_builds_from_toml_values():
    cfg = build(LocalTrainConfig, {"steps": 5, "lr": 1, "max_grad_norm": 2}, "client")
    assert cfg == LocalTrainConfig(steps=5, lr=1.0, max_grad_norm=2.0)
    assert isinstance(cfg.lr, float)


# -- local learning-rate schedules --------------------------------------------------------
def test_inverse_power_factors_match_hand_values():
    cfg = LocalTrainConfig(lr_schedule="inverse_power")  # the paper's a = 0.001, b = 0.75
    assert cfg.lr_factor(0) == 1.0
    assert cfg.lr_factor(1000) == pytest.approx(2.0**-0.75)  # 0.5946
    assert cfg.lr_factor(3000) == pytest.approx(4.0**-0.75)  # 0.3536
    assert LocalTrainConfig().lr_factor(1000) == 1.0
    assert sorted(LR_SCHEDULES) == ["constant", "inverse_power"]


def test_inverse_power_sets_each_steps_rate_and_restores_it():
    x, y = blobs(40)
    model = make_model()
    reference = make_model()
    cfg = LocalTrainConfig(
        steps=4,
        batch_size=10,
        lr=0.2,
        momentum=0.9,
        lr_schedule="inverse_power",
        lr_decay=1.0,
        lr_power=1.0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    seen = []
    train_local(
        model,
        x,
        y,
        cfg,
        generator=gen(0),
        optimizer=opt,
        before_step=lambda s: seen.append(opt.param_groups[0]["lr"]),
    )
    assert seen == [0.2, 0.1, 0.2 / 3, 0.05]  # 0.2 / (1 + t), t = 0, 1, 2, 3
    assert opt.param_groups[0]["lr"] == 0.2  # restored for the next round
    # the same run by hand: SGD with momentum, its rate set before each step
    ref = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    perm = torch.randperm(40, generator=gen(0))
    for t in range(4):
        idx = perm[10 * t : 10 * (t + 1)]
        ref.param_groups[0]["lr"] = 0.2 * (1.0 + t) ** -1.0
        ref.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        ref.step()
    assert weights_equal(get_weights(model), get_weights(reference))


def test_constant_schedule_and_zero_decay_are_bitwise_the_unscheduled_run():
    x, y = blobs(60)
    runs = []
    for extra in (
        {},
        {"lr_schedule": "constant"},
        {"lr_schedule": "inverse_power", "lr_decay": 0.0},
    ):
        model = make_model()
        cfg = LocalTrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, **extra)
        train_local(model, x, y, cfg, generator=gen(3))
        runs.append(get_weights(model))
    assert weights_equal(runs[0], runs[1]) and weights_equal(runs[0], runs[2])
    model = make_model()
    cfg = LocalTrainConfig(
        epochs=2, batch_size=16, lr=0.1, momentum=0.9, lr_schedule="inverse_power"
    )
    train_local(model, x, y, cfg, generator=gen(3))
    assert not weights_equal(runs[0], get_weights(model))


def test_a_scheduled_rate_keeps_the_sgd_client_off_the_batched_path():
    from types import SimpleNamespace

    from clients.sgd import SGDClient
    from fedopt import vectorized

    model = make_model()
    job = SimpleNamespace(model=model, config={}, order=None)
    cfg = LocalTrainConfig(lr_schedule="inverse_power")
    assert vectorized.unsupported(model, LocalTrainConfig()) is None  # batched otherwise
    assert SGDClient(cfg, scenario=None).fit_many([job], [{}]) is None
