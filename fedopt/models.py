"""Reference models (logreg, mlp, cnn) and the builder for registered and custom models.

Every model factory, built-in or user-written, has one calling convention::

    factory(input_shape: tuple[int, ...], num_classes: int, **params) -> torch.nn.Module

A factory that also declares a ``text`` keyword receives the task's
:class:`~fedopt.data.TextSpec` (task kind, vocabulary size, pad id), which is
how text models (:mod:`fedopt.text.models`) size their embeddings and heads.
Built-in factories are registered in :data:`fedopt.registry.MODELS` together
with the frozen dataclass of their scenario parameters. A scenario may instead
name a custom factory as ``"package.module:factory"``; :func:`build_model`
imports it and calls it with the scenario's parameter table as keyword
arguments. Either way the result is built under a fixed seed (bitwise
reproducible, global RNG untouched) and checked once with a dummy batch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedopt import params as params_mod
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import MODELS, NoParams

__all__ = [
    "CnnParams",
    "MlpParams",
    "build_model",
    "cnn",
    "is_custom_model",
    "logreg",
    "mlp",
]

_CUSTOM_NAME = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_FACTORY_SIGNATURE = "factory(input_shape, num_classes, **params) -> torch.nn.Module"
_ACTIVATIONS: Mapping[str, type[nn.Module]] = types.MappingProxyType(
    {"relu": nn.ReLU, "tanh": nn.Tanh}
)


@dataclass(frozen=True)
class MlpParams:
    """Parameters of the ``mlp`` model.

    Attributes
    ----------
    hidden : tuple of int
        Widths of the hidden layers, input side first (empty: a linear model).
    activation : {"relu", "tanh"}
        Non-linearity after each hidden layer.
    """

    hidden: tuple[int, ...] = (128,)
    activation: Literal["relu", "tanh"] = "relu"

    def __post_init__(self) -> None:
        check(all(h >= 1 for h in self.hidden), "hidden", self.hidden, "positive layer widths")
        check(
            self.activation in _ACTIVATIONS,
            "activation",
            self.activation,
            "one of " + ", ".join(sorted(_ACTIVATIONS)),
        )


@dataclass(frozen=True)
class CnnParams:
    """Parameters of the ``cnn`` model.

    Attributes
    ----------
    channels : tuple of int
        Output channels of the 3x3 convolution blocks, one block per entry.
    groups : int
        Number of GroupNorm groups; every entry of ``channels`` must be divisible by it.
    hidden : int
        Width of the fully connected layer before the classifier.
    """

    channels: tuple[int, ...] = (16, 32)
    groups: int = 4
    hidden: int = 64

    def __post_init__(self) -> None:
        check(len(self.channels) >= 1, "channels", self.channels, "at least one channel count")
        check(
            all(c >= 1 for c in self.channels), "channels", self.channels, "positive channel counts"
        )
        check(self.groups >= 1, "groups", self.groups, "a positive number of GroupNorm groups")
        check(
            all(c % self.groups == 0 for c in self.channels),
            "channels",
            self.channels,
            f"channel counts divisible by groups = {self.groups}",
        )
        check(self.hidden >= 1, "hidden", self.hidden, "a positive layer width")


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: flatten, then one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: tuple[int, ...] = (128,),
    activation: str = "relu",
) -> nn.Module:
    """Multi-layer perceptron: flatten, then linear layers with a non-linearity between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: tuple[int, ...] = (16, 32),
    groups: int = 4,
    hidden: int = 64,
) -> nn.Module:
    """Small CNN with GroupNorm (DP-SGD compatible) for image-shaped data (C, H, W)."""
    if len(input_shape) != 3:
        raise ConfigError(
            "model.name",
            "cnn",
            f"image-shaped data (C, H, W); the dataset gives {tuple(input_shape)}",
        )
    in_ch, h, w = (int(d) for d in input_shape)
    layers: list[nn.Module] = []
    for out_ch in channels:
        layers += [
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.GroupNorm(groups, out_ch),
            nn.ReLU(),
        ]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        in_ch = out_ch
    out_h, out_w = min(h, 2), min(w, 2)
    layers += [
        nn.AdaptiveAvgPool2d((out_h, out_w)),
        nn.Flatten(),
        nn.Linear(in_ch * out_h * out_w, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)


MODELS.register("logreg", logreg, params=NoParams)
MODELS.register("mlp", mlp, params=MlpParams)
MODELS.register("cnn", cnn, params=CnnParams)


def is_custom_model(name: str) -> bool:
    """Return True when ``name`` has the form ``"package.module:factory"``."""
    return bool(_CUSTOM_NAME.match(name))


def _with_text(factory: Any, kwargs: dict[str, Any], text: Any) -> dict[str, Any]:
    """``kwargs`` plus ``text=`` for factories that declare a ``text`` keyword (text models)."""
    try:
        accepts = "text" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = False
    return {**kwargs, "text": text} if accepts else kwargs


def _registered(
    name: str, params: Any, input_shape: tuple[int, ...], num_classes: int, text: Any
) -> Any:
    """Call a registered factory with its params dataclass expanded to keywords."""
    try:
        entry = MODELS.get(name, key="model.name")
    except ConfigError as err:
        raise ConfigError(
            err.key, err.value, f"{err.allowed}; or a custom factory 'package.module:factory'"
        ) from None
    if params is None:
        params = entry.params()
    elif isinstance(params, Mapping):
        params = params_mod.build(entry.params, params, "model")
    kwargs = _with_text(entry.obj, dataclasses.asdict(params), text)
    return entry.obj(input_shape, num_classes, **kwargs)


def _custom(
    name: str, params: Any, input_shape: tuple[int, ...], num_classes: int, text: Any
) -> Any:
    """Import ``"package.module:factory"`` and call it with ``params`` as keywords."""
    module_name, attr = name.split(":")
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        kwargs = dataclasses.asdict(params)
    else:
        kwargs = dict(params or {})
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is a config problem
        raise ConfigError(
            "model.name",
            name,
            f"an importable module providing {_FACTORY_SIGNATURE}; importing "
            f"'{module_name}' failed with {type(err).__name__}: {err}",
        ) from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(
            "model.name",
            name,
            f"a callable {_FACTORY_SIGNATURE}; module '{module_name}' has no callable '{attr}'",
        )
    try:
        model = factory(input_shape, num_classes, **_with_text(factory, kwargs, text))
    except TypeError as err:
        given = ", ".join(sorted(kwargs)) or "none"
        raise ConfigError(
            "model.name",
            name,
            f"a factory accepting {_FACTORY_SIGNATURE} with the model parameters given "
            f"(keywords: {given}); calling it raised TypeError: {err}",
        ) from err
    except Exception as err:  # any failure of the user's factory is a config problem
        raise ConfigError(
            "model.name",
            name,
            f"a factory that builds a model for inputs of shape {input_shape} and "
            f"{num_classes} classes; calling it raised {type(err).__name__}: {err}",
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model.name",
            name,
            f"a factory returning a torch.nn.Module; it returned {type(model).__name__}",
        )
    if next(model.parameters(), None) is None:
        raise ConfigError(
            "model.name", name, "a model with parameters to train; the one built has none"
        )
    return model


def _check_output(
    model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int, text: Any
) -> None:
    """Run a dummy batch of two through ``model`` and check the output shape.

    Text models get token ids (zeros) and, for language modelling, must give
    one row of ``num_classes`` (vocabulary) logits per position.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dtype = torch.float32 if text is None else torch.long
            out = model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    except Exception as err:  # any forward failure is a config problem
        raise ConfigError(
            "model.name",
            name,
            f"a model that accepts inputs of shape {input_shape}; its forward pass "
            f"raised {type(err).__name__}: {err}",
        ) from err
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    per_token = text is not None and text.kind == "lm"
    want = (2, *input_shape, num_classes) if per_token else (2, num_classes)
    if shape != want:
        wanted = f"(batch, {', '.join(map(str, want[1:]))})"
        raise ConfigError(
            "model.name",
            name,
            f"a model whose output for inputs of shape {input_shape} is {wanted}; it gave {shape}",
        )


def build_model(
    name: str,
    params: Any,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    text: Any = None,
) -> nn.Module:
    """Build a model with deterministic initial weights and check its output shape.

    Parameters
    ----------
    name : str
        A name registered in ``MODELS`` or a custom ``"package.module:factory"``.
    params : dataclass, Mapping or None
        For a registered model, an instance of its params dataclass (a mapping
        is built into one; None means the defaults). For a custom factory, a
        mapping of keyword arguments (may be empty).
    input_shape : tuple of int
        Shape of one example, without the batch dimension.
    num_classes : int
        Number of output logits.
    seed : int
        Seed of the initial weights; the global torch RNG state is left untouched.
    text : TextSpec, optional
        The task's text description (token ids); handed to factories that take a
        ``text`` keyword.

    Returns
    -------
    torch.nn.Module
        The model, in training mode.

    Raises
    ------
    ConfigError
        Under key ``model.name`` for an unknown name, a custom factory that cannot
        be imported or called, or a model whose output is not ``(batch, num_classes)``.
    """
    shape = tuple(int(d) for d in input_shape)
    builder = _custom if is_custom_model(name) else _registered
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(name, params, shape, num_classes, text)
        _check_output(model, name, shape, num_classes, text)
    return model
