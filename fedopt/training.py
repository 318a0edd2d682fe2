"""Local training and evaluation of one model on one client's tensors, plus weight transfer.

The functions here are plain PyTorch and keep no state between calls, so one
process can train many virtual clients back to back on a single resident
model: load the client's starting weights with :func:`load_weights_` (an
in-place copy), call :func:`train_local` with the client's own
``torch.Generator``, and read the result back with :func:`get_weights`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedopt.errors import did_you_mean
from fedopt.params import check
from fedopt.registry import OPTIMIZERS

__all__ = [
    "IGNORE_INDEX",
    "LR_SCHEDULES",
    "EvalResult",
    "LocalTrainConfig",
    "TrainResult",
    "evaluate",
    "get_weights",
    "load_weights_",
    "objective",
    "per_example_loss",
    "sample_mean_loss",
    "shuffled_batches",
    "train_local",
]

#: Label of a position that no loss counts (padding, an instruction's prompt tokens).
IGNORE_INDEX = -100


def _sgd(parameters: list[nn.Parameter], cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    """Stochastic gradient descent with optional heavy-ball momentum and weight decay."""
    return torch.optim.SGD(
        parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _adam(parameters: list[nn.Parameter], cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    """Adam with the default betas and L2 weight decay."""
    return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS.register("sgd", _sgd)
OPTIMIZERS.register("adam", _adam)


def _constant(t: int, *, decay: float, power: float) -> float:
    """No schedule: every step at the configured rate."""
    return 1.0


def _inverse_power(t: int, *, decay: float, power: float) -> float:
    """``(1 + decay·t)^(-power)``: the per-step decay of Curricula in FL (``exp_lr_decay``)."""
    return (1.0 + decay * t) ** (-power)


#: Local learning-rate schedules: step t (0 = the round's first step) -> factor on ``lr``.
LR_SCHEDULES: Mapping[str, Callable[..., float]] = types.MappingProxyType(
    {"constant": _constant, "inverse_power": _inverse_power}
)


@dataclass(frozen=True)
class LocalTrainConfig:
    """How a client trains locally in one round.

    Attributes
    ----------
    epochs : int
        Passes over the local data (ignored when ``steps`` is set).
    steps : int or None
        If set, exactly this many minibatch steps, reshuffling at each pass.
    batch_size : int
        Minibatch size; the last partial batch of a pass is kept.
    optimizer : str
        A name registered in ``OPTIMIZERS`` (``sgd``, ``adam``).
    lr : float
        Learning rate.
    momentum : float
        SGD momentum in [0, 1).
    weight_decay : float
        L2 penalty coefficient (>= 0).
    max_grad_norm : float or None
        If set, gradients are clipped to this global L2 norm before each step.
    lr_schedule : str
        A name in ``LR_SCHEDULES``: ``constant`` (default, no schedule) or
        ``inverse_power``, the rate ``lr·(1 + lr_decay·t)^(-lr_power)`` at local
        step t = 0, 1, ... of the round (restarted every round, as Curricula in
        FL's clients do).
    lr_decay : float
        ``inverse_power``'s a (the paper's 0.001); >= 0.
    lr_power : float
        ``inverse_power``'s exponent b (the paper's 0.75); >= 0.
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    lr_schedule: str = "constant"
    lr_decay: float = 0.001
    lr_power: float = 0.75

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(self.steps is None or self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        names = OPTIMIZERS.names()
        check(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            "one of " + ", ".join(names) + did_you_mean(self.optimizer, names),
        )
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite number > 0")
        check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        check(
            0.0 <= self.weight_decay < math.inf,
            "weight_decay",
            self.weight_decay,
            "a finite number >= 0",
        )
        check(
            self.max_grad_norm is None or 0.0 < self.max_grad_norm < math.inf,
            "max_grad_norm",
            self.max_grad_norm,
            "a finite number > 0, or omitted for no clipping",
        )
        schedules = sorted(LR_SCHEDULES)
        check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            self.lr_schedule,
            "one of " + ", ".join(schedules) + did_you_mean(self.lr_schedule, schedules),
        )
        for key in ("lr_decay", "lr_power"):
            value = getattr(self, key)
            check(0.0 <= value < math.inf, key, value, "a finite number >= 0")

    def lr_factor(self, t: int) -> float:
        """The schedule's factor on ``lr`` at local step ``t`` (0 = the round's first step)."""
        return LR_SCHEDULES[self.lr_schedule](t, decay=self.lr_decay, power=self.lr_power)

    def total_steps(self, n: int) -> int:
        """Minibatch steps of one round on ``n`` examples: ``steps``, else epochs x batches."""
        return (
            self.steps if self.steps is not None else self.epochs * math.ceil(n / self.batch_size)
        )

    def planned_work(self, n: int) -> float:
        """Examples one round on ``n`` examples processes, as :func:`train_local` reports it.

        ``epochs`` full passes, or ``steps`` minibatches whose passes end with a
        partial batch.
        """
        if n <= 0:
            return 0.0
        per_pass = math.ceil(n / self.batch_size)
        full, rest = divmod(self.total_steps(n), per_pass)
        return float(full * n + rest * self.batch_size)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one call of :func:`train_local`.

    Attributes
    ----------
    loss : float
        Example-weighted mean data loss over the steps run; nan if a loss was non-finite.
    accuracy : float
        Accuracy on the minibatches seen.
    num_examples : int
        Size of the client's training set (its aggregation weight).
    steps : int
        Optimizer steps taken.
    examples_processed : int
        Sum of the batch sizes of the steps taken (the work for the virtual clock).
    """

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    examples_processed: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a data set."""

    loss: float
    accuracy: float
    num_examples: int


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels as (units, classes) and (units,): examples, or tokens of sequences."""
    if logits.ndim == y.ndim + 1 and logits.ndim > 2:
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return logits, y


def objective(
    logits: torch.Tensor, y: torch.Tensor, *, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of a batch, its correct predictions and the number of labels counted.

    One objective serves both kinds of task: labels of shape ``(b,)`` against
    logits ``(b, classes)`` (classification), and token labels ``(b, L)``
    against logits ``(b, L, vocab)`` (language modelling; ``y[:, t]`` is the
    target of position ``t``, so the shift is the data's job). Labels equal to
    :data:`IGNORE_INDEX` count nowhere.

    Returns
    -------
    loss : torch.Tensor
        Mean (``reduction="mean"``) or sum (``"sum"``) over the counted labels.
    correct : torch.Tensor
        Counted labels whose arg-max logit is right (no gradient).
    count : torch.Tensor
        Labels counted: examples, or tokens.
    """
    flat_logits, flat_y = _flat(logits, y)
    loss = F.cross_entropy(flat_logits, flat_y, reduction=reduction, ignore_index=IGNORE_INDEX)
    counted = flat_y != IGNORE_INDEX
    with torch.no_grad():
        correct = ((flat_logits.argmax(dim=-1) == flat_y) & counted).sum()
    return loss, correct, counted.sum()


def sample_mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's examples of :func:`per_example_loss` (DP-SGD's loss).

    Equal to :func:`objective`'s loss for classification; for sequences each
    example weighs the same, so a per-sample gradient is that of one example.
    """
    if not (logits.ndim == y.ndim + 1 and logits.ndim > 2):
        return F.cross_entropy(logits, y)
    return per_example_loss(logits, y).mean()


def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's cross-entropy, shape ``(b,)``: a sequence's is its mean over counted tokens.

    The per-sample loss of DP-SGD (every example weighs the same whatever its
    length) and of curriculum scoring. A sequence with no counted token scores 0.
    """
    if not (logits.ndim == y.ndim + 1 and logits.ndim > 2):
        return F.cross_entropy(logits, y, reduction="none")
    tokens = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        y.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).reshape(y.shape)
    counts = (y != IGNORE_INDEX).sum(dim=tuple(range(1, y.ndim)))
    return tokens.sum(dim=tuple(range(1, y.ndim))) / counts.clamp(min=1)


def shuffled_batches(
    n: int, batch_size: int, total_steps: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Yield ``total_steps`` index batches, drawing a fresh permutation at each pass."""
    done = 0
    while done < total_steps:
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            if done == total_steps:
                return
            yield perm[start : start + batch_size]
            done += 1


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTrainConfig,
    *,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    batches: Iterable[torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy and a fresh optimizer.

    The one minibatch loop of every SGD-style local optimizer: methods that
    keep their optimizer across rounds pass it in, and methods that steer each
    step (a per-step learning rate, a statistic of the step taken) do so from
    the step hooks, so batching, divergence checks and bookkeeping stay shared.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; only parameters with ``requires_grad`` change.
    x, y : torch.Tensor
        Inputs and integer labels (per example, or per token: see :func:`objective`),
        already on the model's device.
    cfg : LocalTrainConfig
        Epochs or steps, batch size and optimizer settings.
    generator : torch.Generator
        CPU generator that draws the minibatch permutations.
    proximal_mu : float
        If > 0, adds ``(mu / 2) * sum ||w - w0||^2`` over the trainable
        parameters, ``w0`` being their values at the start of the call (FedProx).
    optimizer : torch.optim.Optimizer, optional
        Use this optimizer (and its state) instead of a fresh one from ``cfg``.
    before_step, after_step : callable, optional
        Called with the 1-based step number before the step's forward pass and
        after its optimizer step. With a ``cfg.lr_schedule`` other than
        ``constant``, each parameter group's rate is set to its rate at the call's
        start times ``cfg.lr_factor(t)`` before ``before_step`` (which may still
        override it), and restored when the call ends.
    batches : iterable of torch.Tensor, optional
        Index tensors to train on, one step each, instead of the shuffled passes
        of ``cfg`` (e.g. a curriculum's ordered, paced stream); the steps taken
        are the length of the stream.

    Returns
    -------
    TrainResult
        Training loss and accuracy, the step count and the work done. A
        non-finite loss stops training at once and gives ``loss = nan``.
    """
    check(
        proximal_mu >= 0.0 and math.isfinite(proximal_mu),
        "proximal_mu",
        proximal_mu,
        "a finite number >= 0",
    )
    n = len(x)
    if n == 0:
        return TrainResult(math.nan, math.nan, 0, 0, 0)
    if y.dtype != torch.long:
        y = y.long()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    if optimizer is None:
        optimizer = OPTIMIZERS.get(cfg.optimizer, key="optimizer").obj(trainable, cfg)
    anchors = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    scheduled = cfg.lr_schedule != "constant"
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    if batches is None:
        batches = shuffled_batches(n, cfg.batch_size, cfg.total_steps(n), generator, x.device)

    # Classification labels none of which is ignored take the unmasked path of each step.
    plain = y.ndim == 1 and not bool((y == IGNORE_INDEX).any())
    was_training = model.training
    model.train()
    loss_sum = 0.0
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    steps = seen = counted = 0
    diverged = False
    try:
        for idx in batches:
            if scheduled:
                factor = cfg.lr_factor(steps)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
            if before_step is not None:
                before_step(steps + 1)
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            if plain:  # objective() without the masks: no label is ignored (same values)
                data_loss = F.cross_entropy(logits, yb, ignore_index=IGNORE_INDEX)
                with torch.no_grad():
                    hits = (logits.argmax(dim=-1) == yb).sum()
                units = None
            else:
                data_loss, hits, units = objective(logits, yb)
            loss = data_loss
            if anchors:
                prox = sum((p - a).pow(2).sum() for p, a in zip(trainable, anchors, strict=True))
                loss = data_loss + 0.5 * proximal_mu * prox
            if units is None and not anchors:
                data_val = total_val = data_loss.item()
                units_val = float(len(idx))
            else:
                counts = units.to(loss.dtype) if units is not None else loss.new_tensor(len(idx))
                data_val, total_val, units_val = torch.stack(
                    [data_loss.detach(), loss.detach(), counts]
                ).tolist()
            if not (math.isfinite(data_val) and math.isfinite(total_val)):
                diverged = True
                break
            loss.backward()
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            if after_step is not None:
                after_step(steps + 1)
            b = len(idx)
            if units_val:
                loss_sum += data_val * units_val
            correct += hits
            steps += 1
            seen += b
            counted += int(units_val)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if scheduled:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base
        model.train(was_training)
    accuracy = int(correct.item()) / counted if counted else math.nan
    loss_mean = math.nan if diverged or not counted else loss_sum / counted
    return TrainResult(loss_mean, accuracy, n, steps, seen)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``; restores the train/eval mode.

    Both are over the labels :func:`objective` counts: examples, or tokens for
    language modelling (so ``exp(loss)`` is the perplexity).
    """
    check(batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
    n = len(x)
    if n == 0:
        return EvalResult(math.nan, math.nan, 0)
    if y.dtype != torch.long:
        y = y.long()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    counted = torch.zeros((), dtype=torch.long, device=x.device)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                loss, hits, units = objective(model(xb), yb, reduction="sum")
                loss_sum += loss.double()
                correct += hits
                counted += units
    finally:
        model.train(was_training)
    total = int(counted.item())
    if not total:
        return EvalResult(math.nan, math.nan, n)
    return EvalResult(float(loss_sum.item()) / total, int(correct.item()) / total, n)


def load_weights_(
    model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor], *, strict: bool = True
) -> None:
    """Copy ``state`` into the model's existing parameters and buffers, in place.

    With ``strict`` (the default) ``state`` must hold every key of the model's
    state_dict; without, any subset of them (e.g. a model's LoRA adapters).
    Values may be torch tensors, numpy arrays or anything with ``.numpy()``
    (Flower's ``Array``).

    Raises
    ------
    ValueError
        If the key sets differ (naming the missing and unexpected keys) or a
        shape differs (naming the key); nothing is copied then.
    """
    targets = model.state_dict()
    missing = [k for k in targets if k not in state] if strict else []
    unexpected = [k for k in state if k not in targets]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    sources: dict[str, torch.Tensor] = {}
    for key in state:
        value = state[key]
        if not isinstance(value, np.ndarray | torch.Tensor) and hasattr(value, "numpy"):
            value = value.numpy()
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()
        source = torch.as_tensor(value)
        if tuple(source.shape) != tuple(targets[key].shape):
            raise ValueError(
                f"weight '{key}' has shape {tuple(source.shape)}, "
                f"the model expects {tuple(targets[key].shape)}"
            )
        sources[key] = source
    with torch.no_grad():
        for key, source in sources.items():
            targets[key].copy_(source)


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Return the model's state_dict as CPU numpy copies, in state_dict order."""
    return {
        key: value.detach().to("cpu", copy=True).numpy()
        for key, value in model.state_dict().items()
    }
