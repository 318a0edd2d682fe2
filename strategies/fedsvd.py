"""The server half of federated LoRA: FedSVD's re-factorisation, FFA-LoRA and FedAvg-LoRA.

One Flower ``FedAvg`` subclass, :class:`LoraStrategy`, runs all three methods.
It sends clients only adapter arrays (never the frozen base, which every
party builds identically), adds the example-weighted mean of the clients'
adapter deltas to the global adapters, and under FedSVD re-factorises each
layer's product B·A by SVD (:func:`fedopt.lora.refactorize`). The arrays it
hands back to the round loop are the whole model, base plus current adapters,
so the server's evaluation model is exactly what the clients hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedopt.errors import ConfigError, RunError
from fedopt.lora import (
    A_FACTOR,
    B_FACTOR,
    TRAINS_ATTR,
    LoraParams,
    adapter_pairs,
    factor_of,
    refactorize,
)
from fedopt.params import check
from fedopt.registry import STRATEGIES, NoParams
from strategies.flower import flower_kwargs

__all__ = ["FedSVDParams", "LoraStrategy"]


@dataclass(frozen=True)
class FedSVDParams:
    """FedSVD (Lee et al., NeurIPS 2025): how often the server re-factorises B·A.

    Attributes
    ----------
    svd_every : int
        Re-factorise after every n-th round's aggregation (1: every round);
        in between, A stays fixed and only B moves, as in FFA-LoRA.
    """

    svd_every: int = 1

    def __post_init__(self) -> None:
        check(self.svd_every >= 1, "svd_every", self.svd_every, "an integer >= 1")


class LoraStrategy(FedAvg):
    """FedSVD (Lee et al., NeurIPS 2025), FFA-LoRA (Sun et al. 2024), FedAvg-LoRA.

    Each round: send the factors in ``sends`` to the clients; receive each
    client's delta of the factors in ``trains``; add their example-weighted
    mean to the global factors; every ``svd_every`` rounds (0: never) replace
    each layer's (B, A) by (U_r Σ_r, V_rᵀ) of P = B·A. Each round's metrics
    carry the norm of the mean delta (``lora_delta_norm``) and of its B part
    alone (``lora_b_delta_norm``), and whether it re-factorised (``lora_svd``).
    FedSVD trains B, sends A and B (A changes with every re-factorisation);
    FFA-LoRA trains B and sends only B (A stays at its initialisation, which
    every party shares); FedAvg-LoRA trains and sends both.

    Parameters
    ----------
    method : str
        The method's name, for the summary.
    trains : tuple of str
        Adapter factors the clients train (``lora_A``, ``lora_B``).
    sends : tuple of str
        Adapter factors sent to the clients.
    svd_every : int
        Re-factorise every this many rounds; 0 never.
    """

    def __init__(
        self,
        *,
        method: str,
        trains: tuple[str, ...],
        sends: tuple[str, ...],
        svd_every: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = method
        self.trains = tuple(trains)
        self.sends = tuple(sends)
        self.svd_every = int(svd_every)
        self.current = ArrayRecord()
        self.refactorized = 0

    def downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of the global arrays that travels to clients: the sent adapter factors."""
        return ArrayRecord({k: arrays[k] for k in arrays.keys() if factor_of(k) in self.sends})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, carrying only the adapters."""
        self.current = arrays
        return super().configure_train(server_round, self.downlink(arrays), config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluate messages, carrying only the adapters."""
        return super().configure_evaluate(server_round, self.downlink(arrays), config, grid)

    def _mean_delta(self, contents: list[Any], keys: list[str]) -> dict[str, np.ndarray]:
        """Example-weighted mean (float64) of the clients' deltas of ``keys``."""
        weights = np.array(
            [float(c["metrics"][self.weighted_by_key]) for c in contents], dtype=np.float64
        )
        total = weights.sum()
        mean = {k: np.zeros(self.current[k].shape, dtype=np.float64) for k in keys}
        if total <= 0:
            return mean
        for content, w in zip(contents, weights, strict=True):
            arrays = content["arrays"]
            frozen = [k for k in arrays.keys() if factor_of(k) and k not in mean]
            missing = [k for k in keys if k not in arrays]
            if frozen or missing:
                raise RunError(
                    f"{self.method}: a client sent adapter arrays {frozen} it must not train "
                    f"and lacks {missing}"
                )
            for k in keys:
                mean[k] += (w / total) * arrays[k].numpy().astype(np.float64)
        return mean

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the mean adapter delta; re-factorise B·A on FedSVD's rounds."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        current = self.current
        keys = [k for k in current.keys() if factor_of(k) in self.trains]
        mean = self._mean_delta(contents, keys)
        new = {k: current[k].numpy().astype(np.float64) + d for k, d in mean.items()}
        svd = self.svd_every > 0 and server_round % self.svd_every == 0
        if svd:
            for a_key, b_key in adapter_pairs(current.keys()).values():
                a = new.get(a_key, current[a_key].numpy().astype(np.float64))
                b_new, a_new = refactorize(torch.from_numpy(new[b_key]), torch.from_numpy(a))
                new[b_key], new[a_key] = b_new.numpy(), a_new.numpy()
            self.refactorized += 1
        out = ArrayRecord()
        for key in current.keys():
            old = current[key]
            out[key] = Array(new[key].astype(old.numpy().dtype)) if key in new else old
        metrics = MetricRecord(dict(self.train_metrics_aggr_fn(contents, self.weighted_by_key)))
        metrics["lora_delta_norm"] = _norm(mean.values())
        metrics["lora_b_delta_norm"] = _norm(d for k, d in mean.items() if factor_of(k) == B_FACTOR)
        metrics["lora_svd"] = int(svd)
        return out, metrics

    def summary_extra(self) -> dict[str, Any]:
        """The method, its factors and the adapter sizes, for summary.json."""
        pairs = adapter_pairs(self.current.keys())
        sizes = {f: 0 for f in (A_FACTOR, B_FACTOR)}
        for key in self.current.keys():
            if (f := factor_of(key)) is not None:
                sizes[f] += int(np.prod(self.current[key].shape))
        total = sum(int(np.prod(self.current[k].shape)) for k in self.current.keys())
        return {
            "lora": {
                "method": self.method,
                "layers": len(pairs),
                "trains": list(self.trains),
                "sends": list(self.sends),
                "svd_every": self.svd_every,
                "refactorizations": self.refactorized,
                "adapter_params": sizes,
                "model_params": total,
            }
        }


def _norm(arrays: Iterable[np.ndarray]) -> float:
    """Frobenius norm of the arrays taken together."""
    return float(np.sqrt(sum(float((a**2).sum()) for a in arrays)))


def _check_scenario(scenario: Any) -> None:
    """LoRA strategies aggregate what the ``lora_dpsgd`` client sends."""
    if not isinstance(scenario.client.params, LoraParams):
        raise ConfigError(
            "client.name",
            scenario.client.name,
            f"'lora_dpsgd' (strategy '{scenario.strategy.name}' aggregates LoRA adapters)",
        )


def _factory(method: str, trains: tuple[str, ...], sends: tuple[str, ...], doc: str) -> Any:
    def build(params: Any, *, scenario: Any) -> LoraStrategy:
        return LoraStrategy(
            **flower_kwargs(),
            method=method,
            trains=trains,
            sends=sends,
            svd_every=getattr(params, "svd_every", 0),
        )

    build.__doc__ = doc
    setattr(build, TRAINS_ATTR, trains)
    build.check_scenario = _check_scenario  # type: ignore[attr-defined]
    build.requires = {"client": {"name": "lora_dpsgd"}}  # type: ignore[attr-defined]
    return build


STRATEGIES.register(
    "fedsvd",
    _factory(
        "fedsvd",
        (B_FACTOR,),
        (A_FACTOR, B_FACTOR),
        "FedSVD (Lee et al., NeurIPS 2025): clients train B; the server re-factorises B·A by SVD.",
    ),
    params=FedSVDParams,
)
STRATEGIES.register(
    "ffa_lora",
    _factory(
        "ffa_lora",
        (B_FACTOR,),
        (B_FACTOR,),
        "FFA-LoRA (Sun et al., ICLR 2024): A frozen at its initialisation; B trained and averaged.",
    ),
    params=NoParams,
)
STRATEGIES.register(
    "fedavg_lora",
    _factory(
        "fedavg_lora",
        (A_FACTOR, B_FACTOR),
        (A_FACTOR, B_FACTOR),
        "FedAvg-LoRA: clients train A and B; the server averages each separately.",
    ),
    params=NoParams,
)
