import sys
import textwrap

import pytest
import torch
from torch import nn

from fedopt.errors import ConfigError
from fedopt.models import CnnParams, MlpParams, build_model, is_custom_model
from fedopt.params import build
from fedopt.registry import MODELS, NoParams

SHAPES = [(64,), (1, 8, 8), (3, 32, 32)]


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "params"), [("logreg", NoParams()), ("mlp", MlpParams(hidden=(32, 16)))]
)
def test_flat_models_output_shape(name, params, shape):
    model = build_model(name, params, input_shape=shape, num_classes=10, seed=0)
    assert model(torch.zeros(5, *shape)).shape == (5, 10)
    assert model.training


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_cnn_output_shape(shape):
    model = build_model("cnn", CnnParams(), input_shape=shape, num_classes=7, seed=0)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_logreg_parameter_count():
    model = build_model("logreg", NoParams(), input_shape=(1, 8, 8), num_classes=10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 64 * 10 + 10


def test_mlp_layers_and_activation():
    params = build(MlpParams, {"hidden": [32, 16], "activation": "tanh"}, "model")
    assert params.hidden == (32, 16)
    model = build_model("mlp", params, input_shape=(64,), num_classes=10, seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_cnn_uses_groupnorm_not_batchnorm():
    model = build_model("cnn", CnnParams(), input_shape=(3, 32, 32), num_classes=10, seed=0)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(4, 16), (4, 32)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(32 * 2 * 2, 64), (64, 10)]


def test_cnn_skips_pool_on_tiny_images():
    params = CnnParams(channels=(4, 4, 4, 4), groups=2, hidden=8)
    model = build_model("cnn", params, input_shape=(1, 4, 4), num_classes=3, seed=0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert model(torch.zeros(1, 1, 4, 4)).shape == (1, 3)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][0].in_features == 4


def test_cnn_on_flat_data_is_named_error():
    with pytest.raises(ConfigError) as info:
        build_model("cnn", CnnParams(), input_shape=(64,), num_classes=10, seed=0)
    assert info.value.key == "model.name"
    assert info.value.value == "cnn"
    assert "(C, H, W)" in info.value.allowed and "(64,)" in info.value.allowed


def test_cnn_channels_must_divide_groups():
    with pytest.raises(ConfigError) as info:
        build(CnnParams, {"channels": [16, 30], "groups": 4}, "model")
    assert info.value.key == "model.channels"
    assert "divisible" in info.value.allowed


def test_mlp_bad_activation_is_named():
    with pytest.raises(ConfigError) as info:
        build(MlpParams, {"activation": "relux"}, "model")
    assert info.value.key == "model.activation"


def test_same_seed_bitwise_equal_different_seed_differs():
    kwargs = {"input_shape": (3, 32, 32), "num_classes": 10}
    a = build_model("cnn", CnnParams(), seed=3, **kwargs)
    b = build_model("cnn", CnnParams(), seed=3, **kwargs)
    c = build_model("cnn", CnnParams(), seed=4, **kwargs)
    assert _state_equal(a, b)
    assert not _state_equal(a, c)


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model("mlp", MlpParams(), input_shape=(64,), num_classes=10, seed=9)
    assert torch.equal(torch.get_rng_state(), before)


def test_unknown_name_lists_known_and_custom_form():
    with pytest.raises(ConfigError) as info:
        build_model("mpl", MlpParams(), input_shape=(64,), num_classes=10, seed=0)
    assert info.value.key == "model.name"
    for name in ("cnn", "logreg", "mlp", "did you mean 'mlp'", "package.module:factory"):
        assert name in info.value.allowed


def test_is_custom_model():
    assert is_custom_model("pkg.mod:factory")
    assert is_custom_model("mod:make_net")
    assert not is_custom_model("mlp")
    assert not is_custom_model("pkg.mod:")
    assert not is_custom_model("pkg mod:f")


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    source = """
        import torch
        from torch import nn

        CALLS = []

        def make(input_shape, num_classes, *, width=4, tag="x"):
            CALLS.append((tuple(input_shape), num_classes, width, tag))
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width),
                                 nn.Linear(width, num_classes))

        def too_wide(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes + 1))

        def not_a_module(input_shape, num_classes):
            return "model"

        def broken_forward(input_shape, num_classes):
            return nn.Linear(3, num_classes)

        def raises(input_shape, num_classes):
            raise RuntimeError("no GPU kernels for this layer")

        def no_parameters(input_shape, num_classes):
            return nn.Flatten()
    """
    pkg = tmp_path / "custompkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    import custompkg.nets

    custompkg.nets.CALLS.clear()
    yield custompkg.nets
    for name in ("custompkg.nets", "custompkg"):
        sys.modules.pop(name, None)


def test_custom_factory_receives_kwargs(custom_module):
    model = build_model(
        "custompkg.nets:make", {"width": 6, "tag": "t"}, input_shape=(5,), num_classes=3, seed=1
    )
    assert custom_module.CALLS == [((5,), 3, 6, "t")]
    assert model[1].out_features == 6
    again = build_model(
        "custompkg.nets:make", {"width": 6, "tag": "t"}, input_shape=(5,), num_classes=3, seed=1
    )
    assert _state_equal(model, again)
    build_model("custompkg.nets:make", {}, input_shape=(5,), num_classes=3, seed=1)
    assert custom_module.CALLS[-1] == ((5,), 3, 4, "x")


def test_custom_wrong_output_width(custom_module):
    with pytest.raises(ConfigError) as info:
        build_model("custompkg.nets:too_wide", {}, input_shape=(5,), num_classes=3, seed=0)
    assert info.value.key == "model.name"
    assert "(5,)" in info.value.allowed
    assert "(batch, 3)" in info.value.allowed and "(2, 4)" in info.value.allowed


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("nosuchpkg_xyz.nets:make", {}, "ModuleNotFoundError"),
        ("custompkg.nets:missing", {}, "no callable 'missing'"),
        ("custompkg.nets:make", {"depth": 3}, "keywords: depth"),
        ("custompkg.nets:not_a_module", {}, "returned str"),
        ("custompkg.nets:broken_forward", {}, "forward pass raised"),
        ("custompkg.nets:raises", {}, "raised RuntimeError: no GPU kernels for this layer"),
        ("custompkg.nets:no_parameters", {}, "the one built has none"),
    ],
)
def test_custom_factory_errors(custom_module, name, params, words):
    with pytest.raises(ConfigError) as info:
        build_model(name, params, input_shape=(5,), num_classes=3, seed=0)
    assert info.value.key == "model.name"
    assert info.value.value == name
    assert words in info.value.allowed


def test_registered_factories_share_custom_convention():
    entry = MODELS.get("mlp")
    model = entry.obj((4,), 2, hidden=(3,), activation="relu")
    assert model(torch.zeros(1, 4)).shape == (1, 2)
