"""DP-SGD local training with Opacus, accounted across every round a client joins."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.sgd import round_config
from fedopt.client import ClientAlgorithm, ClientJob, ClientUpdate
from fedopt.errors import ConfigError
from fedopt.privacy.calibration import calibrate_noise
from fedopt.privacy.plan import DPSGDParams, Ledger, local_plan, sigma_request
from fedopt.registry import CLIENTS, OPTIMIZERS
from fedopt.training import objective, sample_mean_loss

__all__ = ["DPSGDClient", "opacus_model_errors", "released_train_metrics"]


def opacus_model_errors(model: nn.Module) -> list[str]:
    """Opacus's objections to ``model`` (``ModuleValidator.validate``), one line each."""
    from opacus.validators import ModuleValidator

    return [str(e) for e in ModuleValidator.validate(model, strict=False)]


class DPSGDClient(ClientAlgorithm):
    """DP-SGD (Abadi et al. 2016) on each client with Opacus's PrivacyEngine.

    Each round the resident model is made private for that round only
    (``make_private(wrap_model=False)``: per-sample gradient hooks, removed
    again afterwards, so a worker serving many clients never accumulates
    hooks): Poisson sampling at q = 1 / ceil(n / batch_size) drawn from the
    job's generator, per-sample clipping to C, Gaussian noise σ·C from a
    generator derived from it, optionally split into physical batches by
    ``BatchMemoryManager``. Only logical steps actually taken are counted.

    The client's ledger (σ, q, steps per round joined) lives in its
    ``Context.state``, so its ε composes everything it ever released, across
    rounds, with the scenario's accountant. With a target ε and no σ, σ is
    calibrated once per client for the planned worst case (participations ×
    local steps); a client whose next round would pass its budget does not
    train and says so (``dp_exhausted = 1``; the server leaves it out).
    """

    metric_stats = {"epsilon": "latest"}

    @classmethod
    def prepare_model(cls, model: nn.Module, *, params: DPSGDParams) -> nn.Module:
        """The model every party uses: checked by Opacus, fixed when ``fix_model`` is set.

        Raises
        ------
        ConfigError
            Under ``client.fix_model`` when Opacus cannot train a layer, naming it.
        """
        errors = opacus_model_errors(model)
        if not errors:
            return model
        if not params.fix_model:
            raise ConfigError(
                "client.fix_model",
                False,
                "true to let Opacus replace the layers it cannot train (" + "; ".join(errors) + ")",
            )
        from opacus.validators import ModuleValidator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fixed = ModuleValidator.fix(model)
        if left := opacus_model_errors(fixed):
            raise ConfigError(
                "model.name", "", "a model Opacus can train; after its fix: " + "; ".join(left)
            )
        return fixed

    def _sigma(self, ledger: Ledger, q: float, tau: int) -> float:
        """σ: given, stored from an earlier round, or calibrated for the plan now."""
        p = self.params
        if p.non_private:
            return 0.0
        if p.noise_multiplier is not None:
            return float(p.noise_multiplier)
        if ledger.sigma is None:
            s = self.scenario
            ledger.sigma = calibrate_noise(
                **sigma_request(
                    p,
                    sample_rate=q,
                    local_steps=tau,
                    rounds=s.run.rounds,
                    clients_per_round=s.clients_per_round,
                    num_clients=s.partition.num_clients,
                )
            )
        return ledger.sigma

    def fit(self, job: ClientJob) -> ClientUpdate:
        p = round_config(self.params, job.config)
        n = len(job.x)
        q, tau = local_plan(p, n)
        ledger = Ledger(job.state.get(Ledger.NAME))
        sigma = self._sigma(ledger, q, tau)
        acc = None if p.non_private else ledger.accountant(p.accountant)
        info: dict[str, float] = {"dp_sigma": sigma, "dp_q": q, "dp_delta": p.delta}
        if acc is not None and p.target_epsilon is not None and n > 0:
            ahead = ledger.accountant(p.accountant)
            ahead.step(noise_multiplier=sigma, sample_rate=q, num_steps=tau)
            if ahead.get_epsilon(p.delta) > p.target_epsilon:
                job.state.set(Ledger.NAME, ledger.to_record())
                return ClientUpdate(
                    arrays=ArrayRecord(job.model.state_dict()),
                    num_examples=n,
                    work=0.0,
                    metrics={
                        **info,
                        "epsilon": acc.get_epsilon(p.delta),
                        "dp_steps": 0,
                        "dp_steps_total": ledger.total_steps,
                        "dp_exhausted": 1,
                    },
                )
        loss, accuracy, steps, seen = (
            _private_train(job, p, sigma=sigma, tau=tau) if n else (0.0, math.nan, 0, 0)
        )
        ledger.record(server_round=job.server_round, noise_multiplier=sigma, rate=q, steps=steps)
        job.state.set(Ledger.NAME, ledger.to_record())
        metrics = {
            **info,
            **released_train_metrics(p, loss=loss, accuracy=accuracy, seen=seen),
            "steps": steps,
            "dp_steps": steps,
            "dp_steps_total": ledger.total_steps,
            "dp_exhausted": 0,
        }
        if acc is not None:
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
            metrics["epsilon"] = acc.get_epsilon(p.delta)
        return ClientUpdate(
            arrays=ArrayRecord(job.model.state_dict()),
            num_examples=n,
            work=p.expected_work(n, steps=steps),
            metrics=metrics,
        )


def released_train_metrics(
    p: DPSGDParams, *, loss: float, accuracy: float, seen: int
) -> dict[str, float]:
    """The training statistics a DP-SGD reply carries.

    The loss, the accuracy and the examples the Poisson masks actually drew
    (``examples_sampled``) are computed on the private batches without noise,
    so they leave the client only under ``release_train_metrics = true``
    (recorded as an unaccounted release in summary.json). Without it, the one
    fact a reply still says about them is a non-finite loss (``train_loss =
    nan``): the run stops there as diverged, and a failed run is not a private
    release. The clock's ``work`` is the public expected work either way
    (:meth:`~fedopt.privacy.plan.DPSGDParams.expected_work`).
    """
    if p.release_train_metrics:
        return {"train_loss": loss, "train_accuracy": accuracy, "examples_sampled": float(seen)}
    return {} if math.isfinite(loss) else {"train_loss": math.nan}


def _private_train(
    job: ClientJob, p: DPSGDParams, *, sigma: float, tau: int
) -> tuple[float, float, int, int]:
    """τ logical DP-SGD steps on the resident model; (loss, accuracy, steps, examples seen)."""
    from opacus import PrivacyEngine

    model = job.model
    y = job.y.long()
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = OPTIMIZERS.get(p.optimizer, key="client.optimizer").obj(trainable, p)
    loader = DataLoader(TensorDataset(job.x, y), batch_size=p.batch_size, generator=job.generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=job.generator))
    noise = torch.Generator(device=job.device).manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        hooks, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=float(p.max_grad_norm),
            poisson_sampling=True,
            noise_generator=noise,
            wrap_model=False,
        )
    was_training = model.training
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _steps(model, dp_opt, dp_loader, p, tau)
    finally:
        hooks.cleanup()
        for t in trainable:
            t.grad = None
        model.train(was_training)


def _steps(
    model: nn.Module, dp_opt: Any, dp_loader: Any, p: DPSGDParams, tau: int
) -> tuple[float, float, int, int]:
    """Run ``tau`` logical steps of an Opacus optimizer; count only steps actually taken."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    loss_sum, correct, counted, steps, seen = 0.0, 0, 0, 0, 0
    diverged = False
    while steps < tau and not diverged:
        manager: Any = (
            BatchMemoryManager(
                data_loader=dp_loader,
                max_physical_batch_size=p.max_physical_batch_size,
                optimizer=dp_opt,
            )
            if p.max_physical_batch_size
            else nullcontext(dp_loader)
        )
        with manager as batches:
            for xb, yb in batches:
                dp_opt.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = sample_mean_loss(logits, yb)
                b = len(yb)
                if b and not math.isfinite(float(loss.detach())):
                    diverged = True
                    break
                loss.backward()  # an empty Poisson batch still takes a noise-only step
                dp_opt.step()
                if b:
                    _, hits, units = objective(logits.detach(), yb)
                    loss_sum += float(loss.detach()) * b
                    correct += int(hits)
                    counted += int(units)
                    seen += b
                if not dp_opt._is_last_step_skipped:
                    steps += 1
                    if steps == tau:
                        break
    if diverged or not seen:
        return math.nan if diverged else 0.0, math.nan, steps, seen
    return loss_sum / seen, correct / max(counted, 1), steps, seen


CLIENTS.register("dpsgd", DPSGDClient, params=DPSGDParams)
