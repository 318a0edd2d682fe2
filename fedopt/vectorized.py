"""Local SGD of a whole pack of clients at once: one batched step for every client (torch.func).

A pack's clients train the same model architecture on their own data, each
with its own minibatch stream. Run one after the other, each step of each
client is a handful of tiny kernels, and for small models the fixed cost
of launching them is most of the time. :func:`train_pack` stacks the
clients' parameters and runs step ``t`` of every client in one
``vmap(grad(...))`` call over the stacked parameters and the clients'
padded minibatches. Each client keeps its own minibatch sequence (drawn
from its own generator exactly as :func:`~fedopt.training.train_local`
draws it), its own loss (a mean over its real examples; padding is labelled
``IGNORE_INDEX`` and counts nowhere) and its own number of steps (a client
that has finished stops moving). The arithmetic is the same, batched, so
the results agree with client-by-client training to float rounding, not
bitwise: that is why it is opt-in (``run.vectorize``).

Covered: SGD with or without heavy-ball momentum (torch's rule, a fresh
buffer per client and round), weight decay, FedProx's proximal term and
gradient clipping to a global norm (each client's gradient scaled by
``min(1, max_norm / (its norm + 1e-6))``, as ``clip_grad_norm_`` does),
on models without buffers or active dropout. Anything else trains client
by client (:func:`unsupported` says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedopt.training import IGNORE_INDEX, LocalTrainConfig, TrainResult, objective, shuffled_batches

__all__ = ["PackJob", "train_pack", "unsupported"]


@dataclass(frozen=True)
class PackJob:
    """One client's share of a pack: its data, settings, generator and starting weights."""

    x: torch.Tensor
    y: torch.Tensor
    cfg: LocalTrainConfig
    generator: torch.Generator
    start: dict[str, torch.Tensor]
    proximal_mu: float = 0.0


def unsupported(model: nn.Module, cfg: LocalTrainConfig) -> str | None:
    """Why a pack of clients with ``model`` and ``cfg`` cannot train batched (None: it can)."""
    if cfg.optimizer != "sgd":
        return "only SGD is batched"
    if any(True for _ in model.buffers()):
        return "the model has buffers (batch norm statistics)"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "dropout draws from the global generator"
    return None


def _batches(job: PackJob, device: torch.device) -> list[torch.Tensor]:
    n = len(job.x)
    if n == 0:
        return []
    total = job.cfg.total_steps(n)
    return list(shuffled_batches(n, job.cfg.batch_size, total, job.generator, device))


def train_pack(
    model: nn.Module, jobs: Sequence[PackJob]
) -> list[tuple[dict[str, torch.Tensor], TrainResult]]:
    """Train every job's client from its ``start`` weights; return each one's weights and result.

    ``model`` gives the architecture (its own weights are not changed).
    """
    device = next(model.parameters()).device
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    params = {k: torch.stack([j.start[k].to(device) for j in jobs]) for k in names}
    anchors = {k: v.clone() for k, v in params.items()}
    streams = [_batches(j, device) for j in jobs]
    steps_of = [len(s) for s in streams]
    width = max((j.cfg.batch_size for j in jobs), default=1)
    b = len(jobs)
    lr = torch.tensor([j.cfg.lr for j in jobs], device=device)
    wd = torch.tensor([j.cfg.weight_decay for j in jobs], device=device)
    mu = torch.tensor([j.proximal_mu for j in jobs], device=device)
    momentum = torch.tensor([j.cfg.momentum for j in jobs], device=device)
    heavy = any(j.cfg.momentum != 0.0 for j in jobs)
    clip = [j.cfg.max_grad_norm for j in jobs]
    max_norm = torch.tensor([math.inf if m is None else m for m in clip], device=device)
    buffers: dict[str, torch.Tensor] = {}

    def loss_fn(p, xb, yb, anchor, mu_c):
        logits = functional_call(model, {**p, **frozen}, (xb,))
        total, hits, count = objective(logits, yb, reduction="sum")
        data = total / count.clamp(min=1)
        prox = sum((p[k] - anchor[k]).pow(2).sum() for k in p)
        return data + 0.5 * mu_c * prox, (data.detach(), hits, count)

    step_fn = vmap(grad_and_value(loss_fn, has_aux=True))
    loss_sum = [0.0] * b
    correct = [0] * b
    counted = [0] * b
    seen = [0] * b
    done = [0] * b
    diverged = [False] * b
    was_training = model.training
    model.train()
    try:
        for t in range(max(steps_of, default=0)):
            active = [t < steps_of[c] and not diverged[c] for c in range(b)]
            xb, yb = _stack_batch(jobs, streams, active, t, width, device)
            grads, (_, (data, hits, count)) = step_fn(params, xb, yb, anchors, mu)
            data_l, hits_l, count_l = data.tolist(), hits.tolist(), count.tolist()
            moving = torch.tensor(active, device=device)
            for c in range(b):
                if not active[c]:
                    continue
                if not math.isfinite(data_l[c]):
                    diverged[c], moving[c] = True, False
                    continue
                loss_sum[c] += data_l[c] * count_l[c]
                correct[c] += int(hits_l[c])
                counted[c] += int(count_l[c])
                seen[c] += len(streams[c][t])
                done[c] += 1
            if any(m is not None for m in clip):
                grads = _clipped(grads, max_norm)
            for k in names:
                shape = (-1,) + (1,) * (params[k].ndim - 1)
                step = grads[k] + wd.view(shape) * params[k]
                if heavy:  # torch: buf = d_p at the first step, then momentum * buf + d_p
                    if t == 0:
                        buffers[k] = step
                    else:
                        new_buf = momentum.view(shape) * buffers[k] + step
                        buffers[k] = torch.where(moving.view(shape), new_buf, buffers[k])
                    step = buffers[k]
                params[k] = params[k] - (moving.view(shape) * lr.view(shape)) * step
    finally:
        model.train(was_training)
    out = []
    for c, job in enumerate(jobs):
        n = len(job.x)
        acc = correct[c] / counted[c] if counted[c] else math.nan
        loss = math.nan if diverged[c] or not counted[c] else loss_sum[c] / counted[c]
        weights = {**{k: params[k][c] for k in names}, **frozen}
        out.append((weights, TrainResult(loss, acc, n, done[c], seen[c])))
    return out


def _clipped(grads: dict[str, torch.Tensor], max_norm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each client's gradient scaled to at most ``max_norm`` in global L2 norm (``inf``: as is).

    The per-client form of ``nn.utils.clip_grad_norm_``: the norm of the
    per-tensor norms, and the factor ``max_norm / (norm + 1e-6)`` clamped to 1.
    """
    b = max_norm.shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(b, -1), dim=1) for g in grads.values()])
    total = torch.linalg.vector_norm(norms, dim=0)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: g * factor.view((-1,) + (1,) * (g.ndim - 1)) for k, g in grads.items()}


def _stack_batch(
    jobs: Sequence[PackJob],
    streams: Sequence[list[torch.Tensor]],
    active: Sequence[bool],
    t: int,
    width: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``t``'s minibatch of every client, padded to ``width`` (labels IGNORE_INDEX)."""
    x0, y0 = jobs[0].x, jobs[0].y
    xb = torch.zeros((len(jobs), width, *x0.shape[1:]), dtype=x0.dtype, device=device)
    yb = torch.full(
        (len(jobs), width, *y0.shape[1:]), IGNORE_INDEX, dtype=torch.long, device=device
    )
    for c, job in enumerate(jobs):
        if active[c]:
            idx = streams[c][t]
            xb[c, : len(idx)] = job.x[idx]
            yb[c, : len(idx)] = job.y[idx]
    return xb, yb
