"""LoRA injection through peft and FedSVD's re-factorisation, against exact identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedopt.errors import ConfigError
from fedopt.lora import (
    LoraParams,
    adapter_pairs,
    adapter_state,
    factor_of,
    inject_lora,
    linear_layers,
    merge_adapters,
    refactorize,
    refactorize_full,
    resolve_targets,
    set_trainable,
)
from fedopt.training import load_weights_


def factors(d_out, r, d_in, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype)
    return b, a


def base_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def lora_model(seed=0, **params):
    return inject_lora(base_model(seed), LoraParams(**{"lora_rank": 3, **params}))


def fill_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if factor_of(name) == "lora_B":
                p.copy_(torch.randn(p.shape, generator=g))


def test_refactorized_a_has_orthonormal_rows_and_the_product_is_kept():
    b, a = factors(12, 4, 20)
    b_new, a_new = refactorize(b, a)
    assert b_new.dtype == a_new.dtype == torch.float32
    assert b_new.shape == (12, 4) and a_new.shape == (4, 20)
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(b_new @ a_new, b @ a, atol=1e-5, rtol=1e-5)


def test_refactorization_keeps_the_row_space_of_a_when_b_has_full_rank():
    # The rows of B·A are combinations of the rows of A: the SVD re-bases A within its row space
    # (orthonormal, ordered by singular value) and never adds a direction, so FedSVD adapts within
    # the same r-dimensional input subspace as FFA-LoRA's frozen A.
    b, a = factors(12, 4, 20, seed=5, dtype=torch.float64)
    _, a_new = refactorize(b, a)
    onto_a = a.T @ torch.linalg.solve(a @ a.T, a)  # projector onto the row space of A
    torch.testing.assert_close(a_new @ onto_a, a_new, atol=1e-12, rtol=0)
    cosines = torch.linalg.svdvals(torch.linalg.qr(a.T)[0].T @ a_new.T)
    torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_qr_route_equals_the_full_svd_route():
    b, a = factors(30, 5, 17, seed=3, dtype=torch.float64)
    b_qr, a_qr = refactorize(b, a)
    b_full, a_full = refactorize_full(b, a)
    signs = torch.sign((a_qr * a_full).sum(dim=1))  # singular vectors are unique up to sign
    assert torch.all(signs.abs() == 1)
    torch.testing.assert_close(a_qr, signs[:, None] * a_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(b_qr, b_full * signs[None, :], atol=1e-12, rtol=0)
    # B_new's columns are U_r Σ_r: their norms are P's singular values, largest first
    sv = torch.linalg.svdvals(b @ a)[:5]
    torch.testing.assert_close(b_qr.norm(dim=0), sv, atol=1e-12, rtol=0)


def test_low_precision_adapters_are_refactorized_in_float64():
    b, a = factors(16, 4, 9, seed=5, dtype=torch.bfloat16)
    b_new, a_new = refactorize(b, a)
    b64, a64 = refactorize(b.double(), a.double())
    assert b_new.dtype == a_new.dtype == torch.bfloat16
    assert torch.equal(b_new, b64.to(torch.bfloat16)) and torch.equal(a_new, a64.to(torch.bfloat16))
    torch.testing.assert_close(b64 @ a64, b.double() @ a.double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("d_out", "r", "d_in"), [(3, 5, 12), (12, 5, 3), (2, 6, 4)])
def test_rank_above_a_layer_dimension_keeps_the_product(d_out, r, d_in):
    b, a = factors(d_out, r, d_in, seed=7, dtype=torch.float64)
    for route in (refactorize, refactorize_full):
        b_new, a_new = route(b, a)
        assert b_new.shape == (d_out, r) and a_new.shape == (r, d_in)
        torch.testing.assert_close(b_new @ a_new, b @ a, atol=1e-12, rtol=0)
        rows = min(r, d_in)  # rows beyond d_in are zero: no more orthonormal rows exist
        torch.testing.assert_close(a_new[:rows] @ a_new[:rows].T, torch.eye(rows, dtype=a.dtype))
        assert not a_new[rows:].any()


def test_zero_b_gives_zero_b_and_orthonormal_a():
    _, a = factors(8, 3, 7)
    b_new, a_new = refactorize(torch.zeros(8, 3), a)
    assert not b_new.any()
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(3), atol=1e-6, rtol=0)


def test_injection_freezes_the_base_and_leaves_the_output_unchanged():
    x = torch.randn(5, 6)
    plain = base_model()
    model = lora_model()
    assert torch.equal(plain(x), model(x))  # B = 0 at initialisation
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "1.lora_A.default.weight",
        "1.lora_B.default.weight",
        "3.lora_A.default.weight",
        "3.lora_B.default.weight",
    }
    assert adapter_pairs(model.state_dict()) == {
        "1.default": ("1.lora_A.default.weight", "1.lora_B.default.weight"),
        "3.default": ("3.lora_A.default.weight", "3.lora_B.default.weight"),
    }
    assert model[1].scaling["default"] == 8.0 / 3


def test_adapter_init_is_shared_by_every_party_and_follows_the_seeds():
    a1 = adapter_state(lora_model(), ["lora_A"])
    a2 = adapter_state(lora_model(), ["lora_A"])
    other_seed = adapter_state(lora_model(lora_seed=1), ["lora_A"])
    other_base = adapter_state(lora_model(seed=1), ["lora_A"])
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    assert all(not torch.equal(a1[k], other_seed[k]) for k in a1)
    assert all(not torch.equal(a1[k], other_base[k]) for k in a1)
    model = base_model()
    state = torch.random.get_rng_state()
    inject_lora(model, LoraParams())
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_targets_by_name_pattern_or_all():
    model = base_model()
    assert linear_layers(model) == ["1", "3"]
    assert resolve_targets(model, []) == ["1", "3"]
    assert resolve_targets(model, ["3"]) == ["3"]
    assert resolve_targets(model, [r"[0-9]"]) == ["1", "3"]
    nested = nn.Sequential()
    nested.add_module("block", nn.Sequential())
    nested.block.add_module("q_proj", nn.Linear(4, 4))
    nested.block.add_module("v_proj", nn.Linear(4, 4))
    assert resolve_targets(nested, ["q_proj"]) == ["block.q_proj"]
    assert resolve_targets(nested, [r"block\.(q|v)_proj"]) == ["block.q_proj", "block.v_proj"]


def test_a_target_that_matches_no_linear_layer_names_the_linear_layers():
    with pytest.raises(ConfigError) as err:
        lora_model(lora_targets=("q_proj",))
    assert err.value.key == "client.lora_targets" and err.value.value == "q_proj"
    assert "1, 3" in str(err.value)
    with pytest.raises(ConfigError):  # Flatten is a module, not a Linear layer
        lora_model(lora_targets=("0",))


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora_rank", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("lora_targets", ("(",))],
)
def test_bad_lora_params_are_named(key, value):
    with pytest.raises(ConfigError) as err:
        LoraParams(**{key: value})
    assert err.value.key == key


def test_refactorization_leaves_every_lora_layer_output_unchanged():
    model = lora_model().eval()
    fill_b(model)
    x = torch.randn(7, 6)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = {}
    for a_key, b_key in adapter_pairs(state).values():
        new[b_key], new[a_key] = refactorize(state[b_key], state[a_key])
    load_weights_(model, new, strict=False)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(new["1.lora_A.default.weight"], state["1.lora_A.default.weight"])


def test_merged_adapters_change_the_output_and_equal_the_lora_forward():
    model = lora_model().eval()
    x = torch.randn(7, 6)
    plain = base_model().eval()
    fill_b(model)
    merged = merge_adapters(model)
    assert set(merged) == {"1.weight", "3.weight"}
    with torch.no_grad():
        for name, w in merged.items():
            plain.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(w)
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_model()(x), model(x), atol=1e-3)


def test_gpt2_style_conv1d_layers_get_adapters():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 5), nn.ReLU(), nn.Linear(8, 3))
    assert linear_layers(model) == ["0", "2"]
    inject_lora(model, LoraParams(lora_rank=2, lora_targets=("0",)))
    fill_b(model)
    model.eval()
    x = torch.randn(4, 5)
    merged = merge_adapters(model)["0.weight"]
    assert merged.shape == (5, 8)  # Conv1D keeps its weight as (in, out)
    torch.testing.assert_close(model[0](x), x @ merged + model[0].base_layer.bias)


def test_set_trainable_and_partial_loading():
    model = lora_model()
    set_trainable(model, ["lora_B"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "1.lora_B.default.weight",
        "3.lora_B.default.weight",
    }
    load_weights_(model, {"3.lora_B.default.weight": torch.ones(4, 3)}, strict=False)
    assert torch.equal(model.state_dict()["3.lora_B.default.weight"], torch.ones(4, 3))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_weights_(model, {"3.lora_C.default.weight": torch.ones(4, 3)}, strict=False)
    with pytest.raises(ValueError, match="shape"):
        load_weights_(model, {"3.lora_B.default.weight": torch.ones(3, 4)}, strict=False)
