"""Privacy checks of built tasks before any engine starts: δ against the data, reachable budgets.

A run's privacy settings can be wrong in ways only the data shows: a δ that
is large for the smallest client, or a target ε that the planned steps of some
client cannot reach with any σ. Both would otherwise surface inside the
clients' first round, after the engine started. :func:`check_tasks` runs every
registered check on every task (the server's tasks, already built) and raises
the first problem as one :class:`~fedopt.errors.ConfigError` line. A check is
``fn(task) -> facts or None`` in :data:`PRIVACY_CHECKS`; the facts (plain
values) are returned for the run's records.

The sample-level check (``sample_level``) covers every client whose params are
a :class:`~fedopt.privacy.plan.DPSGDParams` (DP-SGD and its LoRA variant) and
that is not ``non_private``:

- δ < 1/n_min, n_min the smallest client's training-set size, unless
  ``client.allow_large_delta`` is set (then the facts say so);
- with σ to calibrate: the target is reachable for every distinct client plan
  (q, τ) as the client will calibrate it (``planned_participations × τ``
  steps, ``max_participations = "expected"`` resolved from the scenario's
  rounds, clients per round and clients exactly as the client resolves it),
  decided by one ε per plan (:func:`~fedopt.privacy.calibration.check_reachable`);
- with σ given and a target (a cap): at least one client fits one round under
  the cap (otherwise no client can ever train);
- a warning when the smallest client's σ (given, or as it will calibrate it)
  buries every step's signal: σ / (q·n_min) above :data:`MEANINGLESS_NOISE`
  (:func:`noise_to_signal`; checked for the smallest client, whose rate,
  hence σ, is the largest).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedopt.errors import ConfigError
from fedopt.privacy.accountants import PrivacyError, make_accountant
from fedopt.privacy.calibration import PrivacyTargetError, calibrate_noise, check_reachable
from fedopt.privacy.plan import DPSGDParams, local_plan, planned_participations, sigma_request
from fedopt.registry import Registry

if TYPE_CHECKING:
    from fedopt.task import Task

__all__ = [
    "MEANINGLESS_NOISE",
    "PRIVACY_CHECKS",
    "check_sample_level",
    "check_tasks",
    "noise_to_signal",
    "train_sizes",
]

#: Noise-to-signal ratio (:func:`noise_to_signal`) of the smallest client above which a run warns.
MEANINGLESS_NOISE = 1.0

#: ``fn(task) -> facts or None``: checks run on every built task before a run starts.
PRIVACY_CHECKS: Registry[Callable[[Any], Mapping[str, Any] | None]] = Registry("privacy check")


def train_sizes(task: Task) -> list[int]:
    """n_k: each client's number of training examples, as ``task.client_data`` splits them.

    Only sizes are computed (:meth:`fedopt.task.Task.train_sizes`); no example
    is copied or, for a generated population, generated.
    """
    return [int(n) for n in task.train_sizes()]


def _check_delta(p: DPSGDParams, n_min: int, cid: int) -> None:
    if p.delta >= 1.0 / n_min and not p.allow_large_delta:
        raise ConfigError(
            "client.delta",
            p.delta,
            f"a δ < 1/n_min = {1.0 / n_min:.3g} (the smallest client, {cid}, has n_min = "
            f"{n_min} training examples); or set client.allow_large_delta = true",
        )


def _check_cap(p: DPSGDParams, plans: Mapping[tuple[float, int], tuple[int, int]]) -> None:
    """Refuse a σ with which one round of every client already passes the cap."""
    sigma, cap = float(p.noise_multiplier), float(p.target_epsilon)
    spent: list[tuple[float, float, int, int, int]] = []
    for (q, tau), (cid, n) in plans.items():  # the first client that fits settles it
        acc = make_accountant(p.accountant)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=tau)
        try:
            eps = acc.get_epsilon(p.delta)
        except PrivacyError:
            continue
        if eps <= cap:
            return
        spent.append((eps, q, tau, cid, n))
    if not spent:
        return  # no ε could be computed at all; the clients will say why
    eps, q, tau, cid, n = min(spent)
    raise PrivacyTargetError(
        "client.target_epsilon",
        p.target_epsilon,
        f"one round with client.noise_multiplier = {sigma:g}: no client can ever train, "
        f"even client {cid} (n_k = {n}: q = {q:g}, {tau} steps, δ = {p.delta:g}, "
        f"{p.accountant}) spends ε = {eps:.4g} in one round; raise the cap or σ",
    )


def check_sample_level(task: Task) -> dict[str, Any] | None:
    """The DP-SGD clients' δ and budget against the task's data; None for other clients.

    Returns
    -------
    dict or None
        ``n_min``, ``delta``, ``delta_times_n_min`` and ``allow_large_delta``
        (the facts a summary records), or None when the check does not apply.

    Raises
    ------
    ConfigError
        Under ``client.delta`` for δ >= 1/n_min without ``allow_large_delta``.
    PrivacyTargetError
        Under ``client.target_epsilon`` for a target some client cannot reach
        (naming the client, n_k and its plan), or a cap no client fits in one round.
    """
    p = task.scenario.client.params
    if not isinstance(p, DPSGDParams) or p.non_private:
        return None
    sizes = task.train_sizes()
    cids = np.flatnonzero(sizes > 0)
    if not len(cids):
        return None
    # each distinct n_k once, ascending, with the smallest client that has it
    distinct, first = np.unique(sizes[cids], return_index=True)
    n_min, cid_min = int(distinct[0]), int(cids[first[0]])
    _check_delta(p, n_min, cid_min)
    plans: dict[tuple[float, int], tuple[int, int]] = {}
    for n, at in zip(distinct.tolist(), first.tolist(), strict=True):
        plans.setdefault(local_plan(p, n), (int(cids[at]), n))
    s = task.scenario
    counts = {"clients_per_round": s.clients_per_round, "num_clients": s.partition.num_clients}
    rounds = planned_participations(p, s.run.rounds, **counts)
    if p.noise_multiplier is None:
        for (q, tau), (cid, n) in plans.items():
            check_reachable(
                **sigma_request(p, sample_rate=q, local_steps=tau, rounds=s.run.rounds, **counts),
                where=f"client {cid} (n_k = {n}, {rounds} rounds x {tau} steps)",
            )
    elif p.target_epsilon is not None:
        _check_cap(p, plans)
    q, tau = local_plan(p, n_min)
    if p.noise_multiplier is not None:
        sigma = float(p.noise_multiplier)
    else:
        request = sigma_request(p, sample_rate=q, local_steps=tau, rounds=s.run.rounds, **counts)
        sigma = calibrate_noise(**request)
    ratio = noise_to_signal(sigma, sample_rate=q, num_examples=n_min)
    if ratio > MEANINGLESS_NOISE:
        warnings.warn(
            f"client {cid_min} (n_k = {n_min}) trains at sigma = {sigma:.4g} on expected "
            f"batches of {q * n_min:.4g}: each step's noise on the mean gradient "
            f"({ratio:.3g} x the clipping norm per coordinate) exceeds the largest clipped "
            "mean gradient, so the model cannot learn; give a larger target_epsilon, fewer "
            "rounds or local steps, or more data per client",
            stacklevel=2,
        )
    return {
        "n_min": n_min,
        "delta": p.delta,
        "delta_times_n_min": p.delta * n_min,
        "allow_large_delta": p.allow_large_delta,
        "sigma_n_min": sigma,
        "noise_to_signal_n_min": ratio,
    }


def noise_to_signal(sigma: float, *, sample_rate: float, num_examples: int) -> float:
    """σ / (q·n): the noise std on a step's mean clipped gradient, in units of the clipping norm.

    A clipped mean gradient has norm at most C; DP-SGD adds N(0, σ²C²) to
    the sum of about q·n clipped gradients, so each coordinate of the mean
    carries noise of std σC/(q·n). Above 1 the noise alone exceeds the
    largest signal any step can have (and the noise's norm grows with the
    square root of the number of parameters besides).
    """
    return float(sigma) / (float(sample_rate) * int(num_examples))


def check_tasks(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Run every registered privacy check on every task; the first problem raises.

    Parameters
    ----------
    tasks : sequence of Task
        The run's (or sweep's) built tasks.

    Returns
    -------
    list of dict
        Per task, ``{check name: facts}`` for the checks that applied.

    Raises
    ------
    ConfigError
        The first problem found, in one line naming the key, the value and what is allowed.
    """
    out = []
    for task in tasks:
        facts = {}
        for entry in PRIVACY_CHECKS:
            found = entry.obj(task)
            if found is not None:
                facts[entry.name] = dict(found)
        out.append(facts)
    return out


PRIVACY_CHECKS.register("sample_level", check_sample_level)
