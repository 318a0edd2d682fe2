"""Zeroth-order math: seeds, in-place perturbations, two-point estimates, replay, Pro, one byte."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedopt import zo
from fedopt.records import ByteCounter


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same_bits(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


X = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def loss_of(model):
    return lambda: nn.functional.cross_entropy(model(X), Y)


# -- seeds and perturbations ----------------------------------------------------------------
def test_pool_seeds_are_pinned_and_in_range():
    base = zo.pool_base_seed(0)
    assert base == zo.pool_base_seed(0) != zo.pool_base_seed(1)
    seeds = zo.pool_seeds(base, 4096)
    assert seeds.dtype == np.int64 and seeds.min() >= 1 and seeds.max() < 10**11
    np.testing.assert_array_equal(seeds[:4], zo.pool_seeds(base, 4)[:4])
    np.testing.assert_array_equal(
        zo.pool_seeds(12345, 3), np.random.default_rng(12345).integers(1, 10**11, 3)
    )
    with pytest.raises(ValueError, match="k >= 1"):
        zo.pool_seeds(base, 0)


def test_sub_seed_is_splitmix64_of_seed_and_index():
    # the first two outputs of SplitMix64 started at 0
    assert zo.sub_seed(0, 0) == 0xE220A8397B1DCDAF >> 1
    assert zo.sub_seed(0, 1) == 0x6E789E6AA1B965F4 >> 1
    seen = {zo.sub_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seen) == 2500 and max(seen) < 2**63


def test_index_dtype_fits_k():
    assert zo.index_dtype(4096) == np.uint16 and zo.index_dtype(65536) == np.uint16
    assert zo.index_dtype(65537) == np.uint32


def test_indices_travel_as_gaps():
    close = np.array([3, 10, 200, 455])
    packed = zo.pack_indices(close, 4096)
    np.testing.assert_array_equal(packed, np.uint8([3, 7, 190, 255]))
    np.testing.assert_array_equal(zo.unpack_indices(packed), close)
    far = np.array([0, 300, 4095])
    packed = zo.pack_indices(far, 4096)
    assert packed.dtype == np.uint16
    np.testing.assert_array_equal(zo.unpack_indices(packed), far)
    assert zo.pack_indices(np.zeros(0, dtype=np.int64), 8).dtype == np.uint8
    with pytest.raises(ValueError, match="strictly increasing"):
        zo.pack_indices(np.array([4, 4]), 8)


def test_z_is_drawn_in_float32_per_parameter_and_cast_to_its_dtype():
    a, b = zo.Noise(mlp()), zo.Noise(mlp(dtype=torch.float64))
    for i in range(len(a.params)):
        za, zb = a.z(7, i), b.z(7, i)
        assert za.dtype == torch.float32 and zb.dtype == torch.float64
        assert torch.equal(za.double(), zb)
        g = torch.Generator().manual_seed(zo.sub_seed(7, i))
        assert torch.equal(za, torch.randn(za.shape, generator=g))
    assert not torch.equal(a.z(7, 0), a.z(8, 0))


def test_frozen_parameters_are_not_coordinates():
    model = mlp()
    model[0].weight.requires_grad_(False)
    noise = zo.Noise(model)
    assert [n for n, _ in noise.params] == ["0.bias", "2.weight", "2.bias"]
    before = model[0].weight.detach().clone()
    noise.step_(3, 1.0, lr=0.1)
    assert torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="no trainable"):
        zo.Noise(mlp().requires_grad_(False))


# -- in-place perturbations ----------------------------------------------------------------
def test_perturb_and_restore_leave_the_weights_bitwise_unchanged():
    model = mlp()
    before = params_of(model)
    noise = zo.Noise(model)
    pert = zo.Perturbation(model, noise)
    with pert.hooked():
        for seed in range(20):
            lp, lm = pert.two_point(loss_of(model), seed=seed, eps=1e-3)
            assert lp != lm
            assert same_bits(before, params_of(model))
    assert same_bits(before, params_of(model))
    assert pert.touched == set(range(4))


def test_adding_and_subtracting_eps_z_in_place_would_drift():
    # why restores copy the module's weights back: +εz, −2εz, +εz moves weights by ulps
    model = mlp()
    before = params_of(model)
    noise = zo.Noise(model)
    for scale in (1e-3, -2e-3, 1e-3):
        noise.add_(5, scale)
    assert not same_bits(before, params_of(model))
    for a, b in zip(before, params_of(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_forward_that_raises_still_restores_the_weights():
    model = mlp()
    before = params_of(model)
    pert = zo.Perturbation(model, zo.Noise(model))

    def bad():
        model[0](X)  # perturbs and restores layer 0
        model[2].weight.sum()
        raise FloatingPointError("boom")

    with pert.hooked(), pytest.raises(FloatingPointError):
        pert.loss(bad, seed=1, scale=0.5)
    assert same_bits(before, params_of(model))


def test_hooked_loss_equals_the_loss_of_the_whole_model_perturbed_at_once():
    model = mlp()
    pert = zo.Perturbation(model, zo.Noise(model))
    with pert.hooked():
        lp = pert.loss(loss_of(model), seed=4, scale=1e-2)
    zo.Noise(model).add_(4, 1e-2)
    with torch.no_grad():
        assert lp == float(loss_of(model)())


class TiedHead(nn.Module):
    """Input embedding and output projection share one matrix (as in GPT-2)."""

    def __init__(self, *, read_directly=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.read_directly = read_directly

    def forward(self, ids):
        h = self.embed(ids).tanh()
        if self.read_directly:  # the parent reads the child's parameter: hooks cannot see it
            return h @ self.embed.weight.T
        return self.head(h)


@pytest.mark.parametrize(("direct", "covered"), [(False, True), (True, False)])
def test_covers_detects_parameters_read_outside_their_modules(direct, covered):
    model = TiedHead(read_directly=direct)
    ids = torch.tensor([1, 2, 3])

    def fn():
        return nn.functional.cross_entropy(model(ids), ids)

    before = params_of(model)
    assert zo.Perturbation(model, zo.Noise(model)).covers(fn, seed=2, eps=0.1) is covered
    assert same_bits(before, params_of(model))


# -- the estimate and the update --------------------------------------------------------------
def test_two_point_estimate_of_a_quadratic_is_the_directional_derivative():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    c = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    holder = nn.Module()
    holder.w = w
    holder.forward = lambda: 0.5 * ((holder.w - c) ** 2).sum()  # type: ignore[method-assign]
    noise = zo.Noise(holder)
    pert = zo.Perturbation(holder, noise)
    with pert.hooked():
        lp, lm = pert.two_point(holder, seed=9, eps=1e-3)
    g = zo.projected_gradient(lp, lm, 1e-3)
    assert g == pytest.approx(float((w.detach() - c) @ noise.z(9, 0)), rel=1e-9)


def test_steps_replayed_from_seed_scalar_pairs_give_the_same_bits():
    trained, replayed = mlp(), mlp()
    noise = zo.Noise(trained)
    pairs = [(11, 0.7), (5, -1.3), (11, 0.2), (99, 2.5)]
    for s, g in pairs:
        noise.step_(s, g, lr=0.05)
    zo.Noise(replayed).replay_([s for s, _ in pairs], [g for _, g in pairs], lr=0.05)
    assert same_bits(params_of(trained), params_of(replayed))
    start = params_of(mlp())
    for i, (a, b) in enumerate(zip(params_of(trained), start, strict=True)):
        expect = b.clone()
        for s, g in pairs:  # the same sum written out (equal up to rounding)
            expect -= 0.05 * g * noise.z(s, i)
        torch.testing.assert_close(a, expect, rtol=1e-6, atol=1e-7)


def test_weight_decay_shrinks_matrices_only():
    model = mlp()
    before = params_of(model)
    zo.Noise(model).step_(1, 0.0, lr=0.1, weight_decay=0.5)
    assert torch.equal(model[0].weight, before[0] * 0.95)
    assert torch.equal(model[0].bias, before[1])


def test_replay_delta_matches_round_by_round_bitwise_and_catch_up_closely():
    seeds = zo.pool_seeds(3, 64)
    rng = np.random.default_rng(0)
    totals = [np.zeros(64)]
    for _ in range(3):  # three rounds of sparse weighted increments
        inc = np.zeros(64)
        inc[rng.choice(64, 10, replace=False)] = rng.normal(size=10)
        totals.append(totals[-1] + inc)
    accs = [t.astype(np.float32) for t in totals]
    server, every_round, late = mlp(), mlp(), mlp()
    for old, new in zip(accs, accs[1:], strict=False):
        zo.replay_delta_(zo.Noise(server), seeds, new, old, lr=0.1)
        zo.replay_delta_(zo.Noise(every_round), seeds, new, old, lr=0.1)
    assert same_bits(params_of(server), params_of(every_round))
    moved = zo.replay_delta_(zo.Noise(late), seeds, accs[-1], accs[0], lr=0.1)
    assert moved == np.count_nonzero(accs[-1])
    for a, b in zip(params_of(server), params_of(late), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_replayed_weighted_sums_are_the_weighted_mean_of_client_models():
    seeds = zo.pool_seeds(5, 32)
    rng = np.random.default_rng(1)
    weights = np.array([0.2, 0.5, 0.3])
    clients, total = [], np.zeros(32)
    for w in weights:
        model = mlp()
        idx = rng.choice(32, 6, replace=False)
        g = rng.normal(size=6)
        zo.Noise(model).replay_(seeds[idx].tolist(), g.tolist(), lr=0.1)
        clients.append(params_of(model))
        np.add.at(total, idx, w * g)
    server = mlp()
    zo.replay_delta_(zo.Noise(server), seeds, total.astype(np.float32), np.zeros(32), lr=0.1)
    for j, p in enumerate(params_of(server)):
        mean = sum(w * c[j] for w, c in zip(weights, clients, strict=True))
        torch.testing.assert_close(p, mean, rtol=1e-5, atol=1e-6)


def test_peak_memory_counts_what_is_tracked_and_allocated():
    w = torch.zeros(1024, 256)  # 1 MiB that exists before
    with zo.PeakMemory(w) as meter:
        a = torch.ones(1024, 256)
        b = a * 2  # 3 MiB live here
        del a, b
        c = torch.ones(512, 256)
    assert meter.peak_bytes == 3 * 2**20 and meter.by_kind["Other"] == 2**20
    del c


# -- FedKSeed-Pro ---------------------------------------------------------------------------
def test_pro_probabilities_follow_the_spec_on_a_hand_made_history():
    clip = 1000.0
    history = {0: [0.0, 3.0, -5.0], 1: [0.0], 2: [0.0, 2000.0], 3: [0.0, -1.0, 1.0, -1.0]}
    psi = [np.mean([abs(min(max(g, -clip), clip)) for g in h]) for h in history.values()]
    assert psi == [8 / 3, 0.0, 500.0, 0.75]
    norm = [(v - 0.0) / (500.0 - 0.0 + 1e-10) for v in psi]
    expect = np.exp(norm) / np.exp(norm).sum()
    abs_sum = np.array([8.0, 0.0, 1000.0, 3.0])  # Σ|clip(ĝ)| without the initial entry
    count = np.array([2, 0, 1, 3])
    np.testing.assert_allclose(zo.pro_scores(abs_sum, count), norm, rtol=1e-12)
    p = zo.pro_probabilities(abs_sum, count, clip=clip)
    np.testing.assert_allclose(p, expect, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0) and p.max() / p.min() <= math.e + 1e-12
    np.testing.assert_allclose(zo.pro_probabilities(np.zeros(5), np.zeros(5)), np.full(5, 0.2))


def test_pro_scores_travel_as_one_byte_each():
    scores = np.array([0.0, 1.0, 0.5, 0.1234])
    codes = zo.scores_to_byte(scores)
    np.testing.assert_array_equal(codes, np.array([0, 255, 128, 31], dtype=np.uint8))
    assert np.abs(zo.scores_from_byte(codes) - scores).max() <= 0.5 / 255


# -- one byte -------------------------------------------------------------------------------
def test_one_byte_codes_known_values():
    assert zo.byte_offset(1.0) == 127 and zo.byte_offset(math.e) == 111
    assert zo.byte_offset(0.0) == 0
    v = np.array([1.0, -math.exp(-1), 0.0, 1e-30, -50.0])
    codes = zo.to_bytes(v, 127)
    np.testing.assert_array_equal(codes, np.array([127, -111, 0, 1, -127], dtype=np.int8))
    back = zo.from_bytes(codes, 127)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, [1.0, -math.exp(-1), 0.0, math.exp(-126 / 16), -1.0])


def test_one_byte_relative_error_is_at_most_half_a_level():
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000) * np.exp(rng.uniform(-3, 3, size=1000))
    off = zo.byte_offset(np.abs(v).max())
    back = zo.from_bytes(zo.to_bytes(v, off), off)
    inside = np.abs(v) >= np.abs(v).max() * math.exp(-126 / 16)
    rel = np.abs(back[inside] - v[inside]) / np.abs(v[inside])
    assert rel.max() <= math.exp(1 / 32) - 1 + 1e-6
    assert np.all(np.sign(back) == np.sign(v))


# -- the wire -------------------------------------------------------------------------------
def test_encode_and_decode_a_reply():
    picks = [3, 1, 3, 0, 3]
    grads = [0.5, -2.0, None, 1500.0, 0.25]
    up = zo.encode_reply(picks, grads, k=8, pro=True)
    np.testing.assert_array_equal(up[zo.Wire.INDEX], np.uint8([0, 1, 2]))  # indices 0, 1, 3 as gaps
    np.testing.assert_array_equal(up[zo.Wire.SCALAR], np.float32([1500.0, -2.0, 0.75]))
    np.testing.assert_array_equal(up[zo.Wire.ABS], np.float32([1000.0, 2.0, 0.75]))
    np.testing.assert_array_equal(up[zo.Wire.COUNT], np.uint8([1, 1, 2]))
    down = zo.decode_reply(up)
    np.testing.assert_array_equal(down["g"], [1500.0, -2.0, 0.75])
    plain = zo.encode_reply(picks, grads, k=8)
    assert set(plain) == {zo.Wire.INDEX, zo.Wire.SCALAR}
    small = zo.decode_reply(zo.encode_reply(picks, grads, k=8, pro=True, one_byte=True))
    assert small is not None and set(small) == {"idx", "g", "abs", "n"}
    np.testing.assert_allclose(small["g"], [1500.0, -2.0, 0.75], rtol=0.033)
    np.testing.assert_allclose(small["abs"], [1000.0, 2.0, 0.75], rtol=0.033)
    assert zo.decode_reply({"w": np.zeros(3)}) is None


def test_raw_wire_arrays_round_trip_without_the_npy_header():
    values = np.arange(200, dtype=np.uint16)
    raw = zo.wire_array(values)
    assert raw.stype == zo.RAW
    np.testing.assert_array_equal(zo.wire_values(raw), values)
    np.testing.assert_array_equal(zo.wire_values(Array(values)), values)
    bc = ByteCounter()
    raw_size = bc.record_size("a", ArrayRecord({"x": raw}))
    npy_size = bc.record_size("a", ArrayRecord({"x": Array(values)}))
    assert raw_size < 400 + 60 and npy_size - raw_size >= 100
