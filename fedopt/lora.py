"""LoRA adapters on any model (through peft) and their SVD re-factorisation: pure tensor math.

Both halves of federated LoRA use this module: clients inject the adapters
into the model every party builds (:func:`inject_lora`), and the server finds
the adapter arrays by their names (:func:`adapter_pairs`) and re-factorises
their product (:func:`refactorize`). A LoRA layer computes
``W0 x + (alpha / r) B A x`` with the base ``W0`` (d_out x d_in) frozen,
``A`` (r x d_in, peft's ``lora_A``) and ``B`` (d_out x r, ``lora_B``).
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fedopt.errors import ConfigError
from fedopt.params import check

__all__ = [
    "A_FACTOR",
    "B_FACTOR",
    "TRAINS_ATTR",
    "LoraParams",
    "adapter_pairs",
    "adapter_state",
    "factor_of",
    "inject_lora",
    "linear_layers",
    "merge_adapters",
    "refactorize",
    "refactorize_full",
    "resolve_targets",
    "set_trainable",
]

#: The two factors of a LoRA layer, as peft names them in the state_dict.
A_FACTOR = "lora_A"
B_FACTOR = "lora_B"
#: Attribute of a registered strategy factory: the factors its clients train (both halves read it).
TRAINS_ATTR = "lora_trains"
_KEY = re.compile(r"^(?P<layer>.+)\.(?P<factor>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoraParams:
    r"""LoRA adapters (Hu et al. 2022) injected with peft: where, what rank, what scale.

    Attributes
    ----------
    lora_targets : tuple of str
        Layers to adapt: a module name (``"q_proj"`` matches every module whose
        qualified name is or ends with it) or a regular expression matched
        against the full qualified name (``"net\..*\.(q|v)_proj"``). Empty: every
        Linear layer. A target that matches no Linear layer is an error that
        lists the model's Linear layers.
    lora_rank : int
        Rank r of each adapter.
    lora_alpha : float
        Scale numerator: the adapter adds ``(lora_alpha / lora_rank) · B A x``.
    lora_dropout : float
        Dropout on the adapter's input during training.
    lora_seed : int
        Seed of A's initialisation (Kaiming-uniform; B starts at 0), mixed with a
        fingerprint of the base weights, so every party builds the same adapters.
    """

    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_seed: int = 0

    def __post_init__(self) -> None:
        check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "an integer >= 1")
        a = self.lora_alpha
        check(a > 0 and math.isfinite(a), "lora_alpha", a, "a finite number > 0")
        d = self.lora_dropout
        check(0.0 <= d < 1.0, "lora_dropout", d, "a probability in [0, 1)")
        check(self.lora_seed >= 0, "lora_seed", self.lora_seed, "an integer >= 0")
        for t in self.lora_targets:
            check(t.strip() != "", "lora_targets", self.lora_targets, "non-empty names")
            try:
                re.compile(t)
            except re.error as err:
                raise ConfigError(
                    "lora_targets", t, f"a module name or a valid regular expression ({err})"
                ) from None


def _is_conv1d(module: nn.Module) -> bool:
    """Transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def linear_layers(model: nn.Module) -> list[str]:
    """Qualified names of the model's linear layers (``nn.Linear``, transformers' ``Conv1D``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target) or re.fullmatch(target, name) is not None


def resolve_targets(
    model: nn.Module, targets: Iterable[str], *, key: str = "client.lora_targets"
) -> list[str]:
    """The qualified names of the linear layers ``targets`` select (all of them when empty).

    Raises
    ------
    ConfigError
        Under ``key`` for a target that matches no linear layer (listing them),
        or a model without any.
    """
    layers = linear_layers(model)
    if not layers:
        raise ConfigError("model.name", type(model).__name__, "a model with Linear layers for LoRA")
    targets = list(targets)
    if not targets:
        return layers
    for t in targets:
        if not any(_matches(t, n) for n in layers):
            raise ConfigError(
                key, t, "names or patterns of the model's Linear layers: " + ", ".join(layers)
            )
    return [n for n in layers if any(_matches(t, n) for t in targets)]


def _fingerprint(model: nn.Module, seed: int) -> int:
    """A 63-bit seed from ``seed`` and the bytes of the model's state (same model, same seed)."""
    h = hashlib.sha256(str(int(seed)).encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def inject_lora(model: nn.Module, params: LoraParams) -> nn.Module:
    """Add peft LoRA adapters to ``model`` in place and freeze everything else; return it.

    The model stays a plain ``nn.Module``; a target layer ``name`` becomes a
    peft ``lora.Linear`` whose state_dict keys are ``name.base_layer.*``,
    ``name.lora_A.default.weight`` and ``name.lora_B.default.weight``. A is
    drawn under a seed derived from ``params.lora_seed`` and the base weights
    (the global RNG is left untouched); B is zero, so the model's output is
    unchanged.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve_targets(model, params.lora_targets)
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=pattern,
        bias="none",
        fan_in_fan_out=any(_is_conv1d(model.get_submodule(n)) for n in names),
    )
    seed = _fingerprint(model, params.lora_seed)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notes for mixed layer kinds
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    return model


def factor_of(key: str) -> str | None:
    """``"lora_A"`` or ``"lora_B"`` for an adapter array's key, else None."""
    m = _KEY.match(key)
    return m["factor"] if m else None


def adapter_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{layer: (A key, B key)}`` of the LoRA layers among state_dict ``keys``, in key order."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _KEY.match(key)
        if m:
            found.setdefault(f"{m['layer']}.{m['adapter']}", {})[m["factor"]] = key
    return {
        layer: (f[A_FACTOR], f[B_FACTOR])
        for layer, f in found.items()
        if A_FACTOR in f and B_FACTOR in f
    }


def set_trainable(model: nn.Module, factors: Iterable[str]) -> None:
    """Let exactly the adapter factors named in ``factors`` train; freeze every other parameter."""
    wanted = set(factors)
    for name, p in model.named_parameters():
        p.requires_grad_(factor_of(name) in wanted)


def adapter_state(model: nn.Module, factors: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the model's adapter arrays of the given factors, by state_dict key."""
    wanted = set(factors)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if factor_of(k) in wanted}


def refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's re-factorisation of ``P = B A``: (B_new, A_new) with orthonormal rows in A_new.

    ``A_new`` holds the top-r right singular vectors of P and ``B_new = U_r Σ_r``,
    so ``B_new A_new = B A`` exactly (P has rank at most r) and ``A_new A_newᵀ = I``.
    Computed in float64 whatever the adapters' dtype, returned in their dtypes.

    Why the cheap route is exact: let ``B = Q R`` be the reduced QR decomposition
    (Q: d_out x k with orthonormal columns, R: k x r, k = min(d_out, r)) and
    ``R A = U' Σ Vᵀ`` the SVD of the small k x d_in matrix. Then
    ``P = B A = Q (R A) = (Q U') Σ Vᵀ``, and ``Q U'`` has orthonormal columns
    because ``(Q U')ᵀ (Q U') = U'ᵀ Qᵀ Q U' = U'ᵀ U' = I``. A factorisation
    ``P = U Σ Vᵀ`` with orthonormal U and V and a non-negative diagonal Σ is an
    SVD of P; since rank(P) <= k, every other singular value of P is 0. So
    ``(Q U', Σ, Vᵀ)`` are P's top singular triplets (unique up to the sign or
    rotation within equal singular values, which leaves ``B_new A_new``
    unchanged), found in O((d_out + d_in) r²) instead of the O(d_out d_in min(d_out,
    d_in)) of the SVD of the d_out x d_in matrix P.

    When ``min(d_out, d_in) < r`` the remaining rows of ``A_new`` complete an
    orthonormal basis (zero rows once d_in < r) with zero columns in ``B_new``.
    """
    d_out, r = b.shape
    b64, a64 = b.detach().to(torch.float64), a.detach().to(torch.float64)
    q, rr = torch.linalg.qr(b64, mode="reduced")
    small = rr @ a64
    u, s, vh = torch.linalg.svd(small, full_matrices=min(small.shape) < r)
    return _assemble(q @ u, s, vh, d_out=d_out, r=r, like=(b, a))


def refactorize_full(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same re-factorisation through the SVD of the full d_out x d_in product (reference)."""
    d_out, r = b.shape
    p = b.detach().to(torch.float64) @ a.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(p, full_matrices=min(p.shape) < r)
    return _assemble(u, s, vh, d_out=d_out, r=r, like=(b, a))


def _assemble(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    *,
    d_out: int,
    r: int,
    like: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Σ_r, V_rᵀ) padded to rank r, in the dtypes and device of ``like``."""
    k = min(r, s.numel())
    b_new = torch.zeros(d_out, r, dtype=torch.float64, device=u.device)
    b_new[:, :k] = u[:, :k] * s[:k]
    a_new = torch.zeros(r, vh.shape[1], dtype=torch.float64, device=u.device)
    rows = min(r, vh.shape[0])
    a_new[:rows] = vh[:rows]
    b_like, a_like = like
    return b_new.to(b_like.dtype), a_new.to(a_like.dtype)


def merge_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer.weight: W0 + (alpha / r) B A}`` of every LoRA layer, in the base weight's layout."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        w = base.weight.detach()
        delta = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        for adapter in module.lora_A:
            ba = module.lora_B[adapter].weight.double() @ module.lora_A[adapter].weight.double()
            delta += module.scaling[adapter] * (ba.T if module.fan_in_fan_out else ba)
        out[f"{name}.weight"] = (w.double() + delta).to(w.dtype)
    return out
