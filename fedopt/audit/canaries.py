"""The ``[audit]`` section: canary designs, which canaries each audited client holds, the insertion.

A one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023) inserts m
canaries, each independently with probability ½, into the training data of
the audited clients. Everything here is derived from the scenario alone
(``[audit] seed``, the client ids), so the ClientApp workers, which build
their own task from the scenario mapping, insert exactly the canaries the
server-side scorer (:mod:`fedopt.audit.scoring`) later scores.

The inclusion vector is used on the training path only to pick the canaries
that join a client's data (:class:`CanaryInsertion`); the scorer never sees
it, and the audit's analysis (:mod:`fedopt.audit.run`) draws it again only
after the run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.privacy.audit import GUESS_FRACTIONS
from fedopt.registry import SECTIONS, Registry
from fedopt.task import derive_seed

__all__ = [
    "CANARY_DESIGNS",
    "AuditParams",
    "CanaryInsertion",
    "Canaries",
    "audited_clients",
    "inclusion",
    "make_canaries",
]

_CONTENT, _INCLUSION = 1, 2  # purposes of the seeds derived from [audit] seed


@dataclass(frozen=True)
class Canaries:
    """m canary examples: inputs of the task's shape and labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


Design = Callable[..., Canaries]
#: ``fn(rng, *, m, pool, scale) -> Canaries``: how canaries are made (``[audit] design``).
CANARY_DESIGNS: Registry[Design] = Registry("canary design")


def _noise(rng: np.random.Generator, *, m: int, pool: Any, scale: float) -> Canaries:
    """Out-of-distribution inputs: i.i.d. N(0, scale²) features and uniformly random labels.

    Their per-sample gradients point in nearly independent directions (random
    inputs in the first layer), so each canary's own contribution to an update
    stands out from the others'.
    """
    x = rng.normal(0.0, scale, size=(m, *pool.input_shape)).astype(np.float32)
    return Canaries(x, rng.integers(0, pool.num_classes, size=m))


def _mislabeled(rng: np.random.Generator, *, m: int, pool: Any, scale: float) -> Canaries:
    """Held-out inputs (the server's test split, with replacement), each with a wrong label."""
    idx = rng.integers(0, len(pool), size=m)
    shift = rng.integers(1, pool.num_classes, size=m)
    return Canaries(pool.x[idx].copy(), (pool.y[idx] + shift) % pool.num_classes)


CANARY_DESIGNS.register("noise", _noise)
CANARY_DESIGNS.register("mislabeled", _mislabeled)


@dataclass(frozen=True)
class AuditParams:
    """One-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023) of DP-SGD clients.

    Attributes
    ----------
    canaries : int
        m, canaries per audited client, each inserted with probability ½.
    clients : tuple of int
        The audited clients (default: the one with the most training examples).
    seed : int
        Seeds the canaries and their inclusion (independently of ``run.seed``).
    design : str
        A registered canary design: ``noise`` (random inputs, random labels)
        or ``mislabeled`` (held-out inputs, wrong labels).
    scale : float
        Standard deviation of the ``noise`` design's features.
    beta : float
        1 − confidence of the lower bounds.
    guess_fractions : tuple of float
        Guess counts tried, as fractions of m (on the scores farthest from
        their split, :func:`fedopt.privacy.audit.guesses_from_scores`); each
        is tested at β / their number. ``[1.0]`` states up front: guess every canary.
    """

    canaries: int = 1000
    clients: tuple[int, ...] = ()
    seed: int = 0
    design: str = "noise"
    scale: float = 1.0
    beta: float = 0.05
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS

    def __post_init__(self) -> None:
        check(self.canaries >= 2, "canaries", self.canaries, "an integer >= 2")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(
            all(c >= 0 for c in self.clients) and len(set(self.clients)) == len(self.clients),
            "clients",
            list(self.clients),
            "distinct client ids >= 0, or omitted for the largest client",
        )
        CANARY_DESIGNS.get(self.design, key="design")
        check(self.scale > 0, "scale", self.scale, "a number > 0")
        check(0.0 < self.beta < 1.0, "beta", self.beta, "a probability 0 < β < 1")
        check(
            bool(self.guess_fractions) and all(0 < f <= 1 for f in self.guess_fractions),
            "guess_fractions",
            list(self.guess_fractions),
            "fractions of m in (0, 1]",
        )

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Refuse what the audit cannot measure: no DP-SGD client, another server loop, ids."""
        from fedopt.privacy.plan import DPSGDParams
        from fedopt.registry import STRATEGIES

        p = scenario.extras["audit"]
        if not isinstance(scenario.client.params, DPSGDParams):
            raise ConfigError(
                "client.name",
                scenario.client.name,
                "a DP-SGD client (dpsgd): [audit] measures the sample-level DP of its updates",
            )
        entry = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
        if getattr(entry.obj, "driver", None) is not None:
            raise ConfigError(
                "strategy.name",
                scenario.strategy.name,
                "a round-based strategy under [audit] (its own server loop bypasses the scorer)",
            )
        if "curriculum" in scenario.extras:
            raise ConfigError(
                "curriculum", "(present)", "no [curriculum] with [audit]: both order local data"
            )
        n = scenario.partition.num_clients
        bad = [c for c in p.clients if c >= n]
        check(not bad, "audit.clients", list(p.clients), f"client ids below {n}")

    def data_order(self, *, scenario: Any) -> CanaryInsertion:
        """The ClientApp-side hook: adds each audited client's included canaries to its data."""
        return CanaryInsertion(scenario)


def _seed(params: AuditParams, cid: int, purpose: int) -> int:
    return derive_seed(params.seed, cid, purpose)


def make_canaries(params: AuditParams, task: Any, cid: int) -> Canaries:
    """Client ``cid``'s m canaries (the same in every process)."""
    pool = task.data.test
    if pool.text is not None:
        raise ConfigError("audit.design", params.design, "a design for numeric inputs, not text")
    rng = np.random.default_rng(_seed(params, cid, _CONTENT))
    design = CANARY_DESIGNS.get(params.design, key="audit.design").obj
    made = design(rng, m=params.canaries, pool=pool, scale=params.scale)
    return Canaries(np.ascontiguousarray(made.x, np.float32), np.asarray(made.y, np.int64))


def inclusion(params: AuditParams, cid: int) -> np.ndarray:
    """Which of client ``cid``'s canaries are inserted: independent fair coins."""
    rng = np.random.default_rng(_seed(params, cid, _INCLUSION))
    return rng.random(params.canaries) < 0.5


def audited_clients(params: AuditParams, task: Any) -> tuple[int, ...]:
    """The audited client ids: as given, else the client with the most training examples."""
    if params.clients:
        return tuple(params.clients)
    sizes = [len(task.client_data(c)[0]) for c in range(task.num_clients)]
    return (int(np.argmax(sizes)),)


class CanaryInsertion:
    """The worker-side half of the audit: an audited client trains on its data plus its canaries.

    It plugs into the ClientApp's data-order hook: ``prepare(job)`` replaces
    ``job.x`` / ``job.y`` of an audited client by its own examples followed by
    its included canaries (Poisson sampling does not see the order), and
    reports nothing. Other clients are left as they are.
    """

    def __init__(self, scenario: Any) -> None:
        self.scenario = scenario
        self.params: AuditParams = scenario.extras["audit"]
        self._data: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @functools.cached_property
    def _task(self) -> Any:
        from fedopt.task import build_task

        return build_task(self.scenario)

    @functools.cached_property
    def audited(self) -> tuple[int, ...]:
        """The audited client ids."""
        return audited_clients(self.params, self._task)

    def prepare(self, job: Any) -> dict[str, float]:
        if job.cid not in self.audited:
            return {}
        key = (job.cid, str(job.x.device))
        if key not in self._data:
            canaries = make_canaries(self.params, self._task, job.cid)
            keep = inclusion(self.params, job.cid)
            cx = torch.from_numpy(canaries.x[keep]).to(job.x.device, job.x.dtype)
            cy = torch.from_numpy(canaries.y[keep]).to(job.y.device, job.y.dtype)
            self._data[key] = (torch.cat([job.x, cx]), torch.cat([job.y, cy]))
        job.x, job.y = self._data[key]
        return {}

    def finish(self, job: Any, update: Any) -> None:
        """Nothing to check after training."""

    def mean_score(self, model: Any, x: torch.Tensor, y: torch.Tensor, state: Any) -> float:
        """The client's mean training loss on its own examples (what queries get without a hook)."""
        from fedopt.training import evaluate

        res = evaluate(model, x, y)
        return res.loss if res.num_examples else 0.0


SECTIONS.register("audit", AuditParams)
