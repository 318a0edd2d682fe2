"""FedKSeed's client half, and zeroth-order FedAvg's: two-point ZO local steps, no backward pass.

Both clients run τ = ``steps`` zeroth-order steps on minibatches of their data,
each with a seed s: L± = L(w ± εz_s) from two forward passes, ĝ = (L⁺ − L⁻)/(2ε),
w ← w − η ĝ z_s (:mod:`fedopt.zo`). Steps whose losses are not finite (or
differ by more than ``max_loss_diff``) are skipped. There is no optimizer and
no gradient: memory is that of inference.

- ``fedkseed`` picks each seed from the server's pool of K candidate seeds
  (uniformly, or by FedKSeed-Pro's probabilities when the server sends them)
  and returns only (seed index, accumulated ĝ) pairs. It keeps the model it
  last synced and the accumulators it synced to in its persistent state, and
  catches up by replaying the accumulators that changed since then.
- ``zo_sgd`` draws a fresh seed for every step (no pool) and returns the whole
  model, for any model-averaging strategy such as ``fedavg``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedopt import zo
from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import CLIENTS
from fedopt.training import LocalTrainConfig, objective, shuffled_batches

__all__ = ["FedKSeedClient", "ZOParams", "ZOSGDClient", "zo_steps"]


W = zo.Wire
#: Persistent client state: the model synced last, its accumulators, version and pool.
STATE_MODEL = "fedkseed-model"
STATE_ACC = "fedkseed-acc"
STATE_SYNC = "fedkseed-sync"
_ORIGIN = "_fedkseed_origin"


@dataclass(frozen=True)
class ZOParams:
    """Zeroth-order local training (two-point estimates, MeZO-style in-place perturbations).

    Attributes
    ----------
    steps : int
        Local steps τ per round (FedKSeed: 200).
    batch_size : int
        Examples per step (FedKSeed: 1).
    lr : float
        Step size η of w ← w − η ĝ z (also the server's replay step).
    eps : float
        Perturbation scale ε (FedKSeed: 5e-4).
    weight_decay : float
        Decay of weight matrices in local steps; the server's replay has none, so
        any value above 0 makes local and replayed models differ (FedKSeed: 0).
    max_loss_diff : float or None
        Skip a step when |L⁺ − L⁻| exceeds this (FedKSeed's ``grad_clip``); omitted: never.
    generator_device : {"cpu", "cuda"}
        Where every party draws the perturbations; all must agree (CPU and CUDA
        generators differ).
    """

    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-3
    eps: float = 5e-4
    weight_decay: float = 0.0
    max_loss_diff: float | None = None
    generator_device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        check(self.eps > 0 and math.isfinite(self.eps), "eps", self.eps, "a finite number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        d = self.max_loss_diff
        check(d is None or d > 0, "max_loss_diff", d, "a number > 0, or omitted")


@dataclass
class _Steps:
    """What a block of ZO steps did: ĝ per step (None: skipped), mean loss, examples, memory."""

    grads: list[float | None]
    loss: float
    examples: int
    peak_bytes: int | None = None


def zo_steps(
    job: ClientJob,
    params: ZOParams,
    noise: zo.Noise,
    seeds: Sequence[int],
    *,
    measure: bool = True,
    check: bool = False,
) -> _Steps:
    """Run one ZO step per seed on the job's minibatches (model in eval mode, no autograd).

    With ``measure``, the peak tensor memory of the first step (model included)
    is recorded in ``peak_bytes``. With ``check``, it first checks on a few
    examples that the module-by-module perturbation reaches every parameter
    the forward pass reads (:meth:`fedopt.zo.Perturbation.covers`).

    Raises
    ------
    ConfigError
        The model reads a parameter outside the modules that hold it.
    """
    model = job.model
    cfg = LocalTrainConfig(steps=len(seeds), batch_size=params.batch_size)
    batches = job.batches(cfg) or shuffled_batches(
        len(job.x), cfg.batch_size, len(seeds), job.generator, job.x.device
    )
    pert = zo.Perturbation(model, noise)
    grads: list[float | None] = []
    losses: list[float] = []
    seen = 0
    peak = None
    was_training = model.training
    model.eval()
    try:
        if check and len(seeds):
            xb, yb = job.x[: params.batch_size], job.y[: params.batch_size].long()
            _check_covers(pert, lambda: objective(model(xb), yb)[0], seeds[0], params)
        with pert.hooked():
            for seed, idx in zip(seeds, batches, strict=False):
                idx = idx.to(job.x.device)
                xb, yb = job.x[idx], job.y[idx].long()
                seen += len(idx)
                meter = zo.PeakMemory(model) if measure and not grads else None

                def loss(meter: zo.PeakMemory | None = meter) -> torch.Tensor:
                    if meter is not None:
                        meter.forward_starts()
                    return objective(model(xb), yb)[0]  # noqa: B023  (used at once)

                with meter or contextlib.nullcontext():
                    g = _step(pert, noise, loss, seed, params)
                if meter is not None:
                    peak = meter.peak_bytes
                grads.append(g)
                if g is not None:
                    losses.append(g[1])
    finally:
        model.train(was_training)
    return _Steps(
        [None if g is None else g[0] for g in grads],
        float(np.mean(losses)) if losses else math.nan,
        seen,
        peak,
    )


def _check_covers(pert: zo.Perturbation, loss: Any, seed: int, params: ZOParams) -> None:
    if not pert.covers(loss, seed=seed, eps=params.eps):
        raise ConfigError(
            "model.name",
            type(pert.model).__name__,
            "a model whose forward reads each trainable parameter inside a module that "
            "holds it (zeroth-order steps perturb parameters module by module)",
        )


def _step(
    pert: zo.Perturbation, noise: zo.Noise, loss: Any, seed: int, params: ZOParams
) -> tuple[float, float] | None:
    """One ZO step: (ĝ, mean of L±), or None when it is skipped."""
    lp, lm = pert.two_point(loss, seed=seed, eps=params.eps)
    cap = params.max_loss_diff
    if not (math.isfinite(lp) and math.isfinite(lm)) or (cap and abs(lp - lm) > cap):
        return None
    g = zo.projected_gradient(lp, lm, params.eps)
    noise.step_(seed, g, lr=params.lr, weight_decay=params.weight_decay)
    return g, 0.5 * (lp + lm)


def _first(algorithm: ClientAlgorithm) -> bool:
    """True the first time a worker's client algorithm trains (when the model is checked)."""
    first = not getattr(algorithm, "_zo_checked", False)
    algorithm._zo_checked = True  # type: ignore[attr-defined]
    return first


def _metrics(res: _Steps) -> dict[str, float]:
    taken = sum(g is not None for g in res.grads)
    out = {"train_loss": res.loss, "zo_skipped": len(res.grads) - taken}
    if res.peak_bytes is not None:
        out["peak_memory_mb"] = res.peak_bytes / 2**20
    return out


def _check_generator(scenario: Any) -> None:
    if scenario.client.params.generator_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "client.generator_device",
            "cuda",
            "'cpu' (no CUDA device here to draw the perturbations on)",
        )


class ZOSGDClient(ClientAlgorithm):
    """Zeroth-order FedAvg (MeZO-style local steps, Malladi et al. 2023): a fresh seed per step.

    The baseline FedKSeed removes the need for: every step draws a new random
    seed, so the update is only expressible as a whole model, which the client
    returns like the first-order ``sgd`` client (pair it with ``fedavg``).
    """

    metric_stats = {"peak_memory_mb": "round"}

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """A CUDA generator device needs CUDA."""
        _check_generator(scenario)

    def fit(self, job: ClientJob) -> ClientUpdate:
        p: ZOParams = self.params
        seeds = torch.randint(1, 2**62, (p.steps,), generator=job.generator).tolist()
        res = zo_steps(
            job, p, zo.Noise(job.model, device=p.generator_device), seeds, check=_first(self)
        )
        return ClientUpdate(
            arrays=ArrayRecord(job.model.state_dict()),
            num_examples=len(job.x),
            work=float(res.examples),
            metrics=_metrics(res),
        )


def _trainable_record(noise: zo.Noise) -> ArrayRecord:
    return ArrayRecord({n: p.detach().cpu() for n, p in noise.params})


def _load_trainable_(noise: zo.Noise, state: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in noise.params:
            p.copy_(torch.as_tensor(np.asarray(state[name])))


class FedKSeedClient(ClientAlgorithm):
    """FedKSeed (Qin et al., ICML 2024): ZO steps on K shared seeds; FedKSeed-Pro sampling.

    Each round the client (1) catches up: from the model and accumulators it
    synced to last time (its persistent state; the initial model if none), it
    replays w ← w − η (A_s − A_s^last) z_s for every seed whose accumulator
    changed, in ascending seed index, exactly as the server did; (2) runs τ ZO
    steps, each on a seed drawn from the pool uniformly or by the Pro
    probabilities; (3) returns, per seed used, its index and Σĝ (with Pro also
    Σ|clip(ĝ)| and the step count, the history the server needs), as float32
    or as one-byte codes when the server sends one-byte accumulators.

    A message that carries the whole model (``arrays``) is a resync by
    download: the client takes that model as synced. One without a seed pool
    payload trains from the model it carries on the scenario's pool and keeps
    no sync state.
    """

    metric_stats = {"peak_memory_mb": "round"}
    #: The paired strategy (for contract tests).
    requires = {"strategy": {"name": "fedkseed"}}

    def __init__(self, params: ZOParams, *, scenario: Any) -> None:
        super().__init__(params, scenario=scenario)
        self._pools: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """The seed pool and its accumulators come from strategy ``fedkseed``."""
        _check_generator(scenario)
        if scenario.strategy.name != "fedkseed":
            raise ConfigError(
                "strategy.name",
                scenario.strategy.name,
                "'fedkseed' (client 'fedkseed' trains on the server's seed pool)",
            )

    @classmethod
    def prepare_model(cls, model: nn.Module, *, params: ZOParams) -> nn.Module:
        """Keep a CPU copy of the initial trainable weights: where a never-synced client starts."""
        origin = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        object.__setattr__(model, _ORIGIN, origin)
        return model

    def load_global(self, model: nn.Module, content: RecordDict) -> None:
        """Load a whole model when the message carries one; pool messages are synced in ``fit``."""
        if "arrays" in content:
            super().load_global(model, content)

    def pool(self, base: int, k: int) -> np.ndarray:
        """The K candidate seeds of ``base`` (cached)."""
        if (base, k) not in self._pools:
            self._pools = {(base, k): zo.pool_seeds(base, k)}
        return self._pools[(base, k)]

    # -- sync ---------------------------------------------------------------------------
    def _received(self, config: Any, payload: ArrayRecord, last: np.ndarray) -> np.ndarray:
        """The accumulators the server sent, as float32 (reconstructed from codes if one-byte)."""
        values = zo.wire_values(payload[W.ACC])
        if values.dtype == np.int8:
            values = zo.from_bytes(values, int(config[W.BYTE_OFFSET]))
        if W.INDEX not in payload:
            return values.astype(np.float32)
        acc = last.copy()
        acc[zo.unpack_indices(zo.wire_values(payload[W.INDEX]))] = values
        return acc

    def sync(self, job: ClientJob, noise: zo.Noise, seeds: np.ndarray) -> int:
        """Bring the resident model to the server's model; store it as this client's synced state.

        Returns the number of seeds replayed.
        """
        config, state = job.config, job.state
        payload: ArrayRecord = job.content[W.PAYLOAD]
        k, version = len(seeds), int(config[W.VERSION])
        sync_rec = state.get(STATE_SYNC)
        if sync_rec is not None and (
            int(sync_rec["k"]) != k or int(sync_rec["seed"]) != int(config[W.SEED])
        ):
            sync_rec = None  # another pool: start over from the initial model
        last_version = int(sync_rec["version"]) if sync_rec is not None else 0
        if last_version < int(config.get(W.BASE, 0)):
            raise RuntimeError(
                f"client {job.cid} synced to version {last_version} but the server sent the "
                f"accumulators changed since version {config[W.BASE]}; its state was lost"
            )
        last = np.zeros(k, dtype=np.float32)
        if sync_rec is not None:
            last = state.get(STATE_ACC)["acc"].numpy().astype(np.float32)
        acc = self._received(config, payload, last)
        replayed = 0
        if "arrays" not in job.content:  # else load_global took the downloaded model as is
            if sync_rec is not None:
                _load_trainable_(noise, state.get(STATE_MODEL).to_torch_state_dict())
            else:
                origin = getattr(job.model, _ORIGIN, None)
                if origin is None:
                    raise RuntimeError(
                        "client 'fedkseed' needs the model built by Task.new_model() (it keeps "
                        "the initial weights a client that never synced starts from)"
                    )
                _load_trainable_(noise, origin)
            replayed = zo.replay_delta_(noise, seeds, acc, last, lr=self.params.lr)
        state.set(STATE_MODEL, _trainable_record(noise))
        state.set(STATE_ACC, ArrayRecord({"acc": Array(acc)}))
        state.set(
            STATE_SYNC,
            ConfigRecord({"version": version, "k": k, "seed": int(config[W.SEED])}),
        )
        return replayed

    # -- a round ------------------------------------------------------------------------
    def fit(self, job: ClientJob) -> ClientUpdate:
        p: ZOParams = self.params
        config = job.config
        sp = self.scenario.strategy.params
        if W.PAYLOAD in job.content:
            base, k = int(config[W.SEED]), int(config[W.K])
        else:  # a plain model message: the scenario's pool, nothing to sync
            base, k = zo.pool_base_seed(self.scenario.run.seed), int(sp.k)
        seeds = self.pool(base, k)
        noise = zo.Noise(job.model, device=p.generator_device)
        if W.PAYLOAD in job.content:
            self.sync(job, noise, seeds)
        payload = job.content.get(W.PAYLOAD)
        pro = payload is not None and W.SCORES in payload
        one_byte = payload is not None and payload[W.ACC].dtype == "int8"
        if pro:
            prob = zo.probabilities_from_scores(
                zo.scores_from_byte(zo.wire_values(payload[W.SCORES]))
            )
            picks = torch.multinomial(
                torch.from_numpy(prob), p.steps, replacement=True, generator=job.generator
            )
        else:
            picks = torch.randint(k, (p.steps,), generator=job.generator)
        picks_np = picks.numpy().astype(np.int64)
        res = zo_steps(job, p, noise, seeds[picks_np].tolist(), check=_first(self))
        clip = float(getattr(self.scenario.strategy.params, "pro_clip", 1000.0))
        up = zo.encode_reply(picks_np, res.grads, k=k, pro=pro, one_byte=one_byte, clip=clip)
        arrays = ArrayRecord({key: zo.wire_array(value) for key, value in up.items()})
        return ClientUpdate(
            arrays=arrays,
            num_examples=len(job.x),
            work=float(res.examples),
            metrics=_metrics(res),
        )


CLIENTS.register("fedkseed", FedKSeedClient, params=ZOParams)
CLIENTS.register("zo_sgd", ZOSGDClient, params=ZOParams)
