"""Curriculum learning for clients: example scores, orderings, pacing and the paced index stream.

The math of curricula in federated learning (Vahidian et al., ICCV 2023) as
pure functions, plus the ``[curriculum]`` scenario section and the per-worker
:class:`DataCurriculum` that the ClientApp adapter asks, every round, for the
client's ordered, paced minibatch stream (``ClientJob.order``). Any local
optimizer that trains through :func:`fedopt.training.train_local` with
``batches=job.batches(cfg)`` is ordered; the server half (curriculum client
selection) lives in ``strategies/curriculum.py``.

No library implements these curricula for PyTorch data streams, so they are
written here, following the paper's released code (``get_pacing_function``,
``client_fedavg_curr_lg_loss.train``).
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import SECTIONS
from fedopt.training import (
    IGNORE_INDEX,
    LocalTrainConfig,
    load_weights_,
    per_example_loss,
    shuffled_batches,
    train_local,
)

__all__ = [
    "ORDERINGS",
    "PACINGS",
    "CurriculumParams",
    "DataCurriculum",
    "example_scores",
    "order_indices",
    "pace",
    "paced_batches",
    "paced_step_count",
    "train_expert",
]

Ordering = Literal["curriculum", "anti", "random", "plain", "none"]
Pacing = Literal["linear", "quad", "root", "step", "exp", "log"]
#: Record in a client's state holding its model after its last local training.
LOCAL_MODEL_RECORD = "curriculum/local"


def _linear(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + (n - nb) * t / (a * total)


def _quad(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + (n - nb) * (t / (a * total)) ** 2


def _root(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + (n - nb) * (t / (a * total)) ** 0.5


def _step(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + n * math.floor(t / (a * total))


def _exp(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + (n - nb) * math.expm1(10.0 * t / (a * total)) / math.expm1(10.0)


def _log(t: float, *, a: float, nb: float, total: int, n: int) -> float:
    return nb + (n - nb) * (1.0 + math.log(t / (a * total) + math.exp(-10.0)) / 10.0)


#: Pacing functions g(t) of the paper's table (N_b = b·N; a = fraction of T at which N is reached).
PACINGS: Mapping[str, Callable[..., float]] = types.MappingProxyType(
    {"linear": _linear, "quad": _quad, "root": _root, "step": _step, "exp": _exp, "log": _log}
)


def pace(name: str, t: int, *, a: float, b: float, total: int, n: int, minimum: int = 1) -> int:
    """Size of the available prefix at step ``t`` of ``total``: ``int(g(t))`` clipped to [1, n].

    ``minimum`` (one batch) raises a smaller prefix to ``min(minimum, n)``.
    """
    size = int(PACINGS[name](float(t), a=a, nb=b * n, total=max(total, 1), n=n))
    size = min(max(size, 1), n)
    return max(size, min(minimum, n))


def _ascending(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.argsort(scores, stable=True)


def _descending(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def _shuffled(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(len(scores), generator=generator)


#: Orderings of examples (or clients) by score: easy first, hard first, or at random.
ORDERINGS: Mapping[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = (
    types.MappingProxyType({"curriculum": _ascending, "anti": _descending, "random": _shuffled})
)


def order_indices(
    scores: torch.Tensor, ordering: str, *, generator: torch.Generator
) -> torch.Tensor:
    """The permutation that puts ``scores`` in ``ordering`` (ties keep their index order)."""
    return ORDERINGS[ordering](scores.detach().cpu(), generator)


def _error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0/1 misclassification per example; a sequence's share of wrong counted tokens."""
    if logits.ndim == y.ndim + 1 and logits.ndim > 2:
        counted = y != IGNORE_INDEX
        wrong = (logits.argmax(dim=-1) != y) & counted
        dims = tuple(range(1, y.ndim))
        return wrong.sum(dim=dims).to(logits.dtype) / counted.sum(dim=dims).clamp(min=1)
    return (logits.argmax(dim=1) != y).to(logits.dtype)


#: Per-example score: the loss, or the 0/1 misclassification (the paper's ``_pred`` variant).
SCORES: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = types.MappingProxyType(
    {"loss": per_example_loss, "error": _error}
)


def example_scores(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    score: str = "loss",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Per-example ``score`` of ``model`` on ``(x, y)``, in batched forward passes (CPU float64)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                logits = model(x[start : start + batch_size])
                out.append(SCORES[score](logits, y[start : start + batch_size].long()).double())
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def paced_step_count(
    *, steps: int, batch_size: int, size_at: Callable[[int], int], finish_pass: bool
) -> int:
    """Steps :func:`paced_batches` yields: ``steps``, or with ``finish_pass`` up to its pass's end.

    The authors' loop (``while step < T: for batch in loader``) checks ``T``
    only between passes, so its last pass, over the prefix ``size_at(t)`` read
    at its start, runs to the end: ``t`` grows by ``ceil(size_at(t) / batch_size)``
    per pass until it reaches ``steps``.
    """
    if not finish_pass:
        return steps
    t = 0
    while t < steps:
        t += max(math.ceil(size_at(t) / batch_size), 1)
    return t


def paced_batches(
    order: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    size_at: Callable[[int], int],
    generator: torch.Generator,
    finish_pass: bool = False,
    passes: list[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Index batches drawn from the growing prefix ``order[: size_at(t)]``, ``steps`` of them.

    As in the paper's code, the prefix is re-read at the start of each pass over
    it and shuffled (the last batch of a pass may be short). The stream stops
    after exactly ``steps`` batches, or, with ``finish_pass`` (the authors'
    loop), at the end of the pass during which ``steps`` is reached:
    :func:`paced_step_count` batches. ``passes``, if given, receives each
    pass's prefix size.
    """
    t = 0
    while t < steps:
        size = size_at(t)
        if passes is not None:
            passes.append(size)
        prefix = order[:size]
        perm = prefix[torch.randperm(size, generator=generator).to(order.device)]
        for start in range(0, size, batch_size):
            if t == steps and not finish_pass:
                return
            yield perm[start : start + batch_size]
            t += 1


@dataclass(frozen=True)
class CurriculumParams:
    """Curricula in FL (Vahidian et al., ICCV 2023): ordered local data and client selection.

    ``ordering`` orders each client's examples by ``score`` under the ``scoring``
    model and paces them with ``pacing`` (a, b) over the round's local steps
    (``none``: the local optimizer's own shuffled passes; ``plain``: shuffled
    passes over all the data, unordered and unpaced, for as many steps as the
    paced stream takes: the equal-steps baseline of ``finish_pass``);
    ``finish_pass`` lets the last paced pass run to its end, as the authors'
    loop does (more steps than the round's T; see :func:`paced_step_count`);
    ``select = true`` also orders clients by their mean score (client pacing
    ``client_pacing`` with ``client_pacing_a``, ``client_pacing_b``).
    ``allow_private_scoring`` opts in to scores of private data released outside
    a DP accountant (DP-SGD clients, ``[user_dp]``).
    """

    ordering: Ordering = "curriculum"
    scoring: Literal["global", "local", "local+global", "expert"] = "global"
    score: Literal["loss", "error"] = "loss"
    pacing: Pacing = "linear"
    pacing_a: float = 0.8
    pacing_b: float = 0.2
    finish_pass: bool = False
    expert_path: str | None = None
    score_batch_size: int = 1024
    select: bool = False
    client_ordering: Literal["curriculum", "anti", "random"] = "curriculum"
    client_pacing: Pacing = "linear"
    client_pacing_a: float = 0.8
    client_pacing_b: float = 0.2
    allow_private_scoring: bool = False

    def __post_init__(self) -> None:
        for key in ("pacing_a", "client_pacing_a"):
            value = getattr(self, key)
            check(0 < value < math.inf, key, value, "a fraction of the steps > 0")
        for key in ("pacing_b", "client_pacing_b"):
            value = getattr(self, key)
            check(0 <= value <= 1, key, value, "an initial fraction in [0, 1]")
        check(self.score_batch_size >= 1, "score_batch_size", self.score_batch_size, ">= 1")
        check(
            (self.scoring == "expert") == (self.expert_path is not None),
            "expert_path",
            self.expert_path,
            "the path of a state_dict checkpoint with scoring = 'expert', else omitted",
        )
        if self.expert_path is not None:
            check(
                Path(self.expert_path).expanduser().is_file(),
                "expert_path",
                self.expert_path,
                "an existing checkpoint file (see fedopt.curriculum.train_expert)",
            )

    @property
    def uses_private_scores(self) -> bool:
        """Whether scores of private data leave the client (client selection)."""
        return self.select

    @classmethod
    def check_scenario(cls, scenario: Any) -> None:
        """Refuse what cannot run, and private scoring under DP without the explicit opt-in."""
        from fedopt.privacy.plan import DPSGDParams
        from fedopt.registry import STRATEGIES

        p = scenario.extras["curriculum"]
        dp_client = isinstance(scenario.client.params, DPSGDParams)
        if dp_client and p.ordering != "none":
            raise ConfigError(
                "curriculum.ordering",
                p.ordering,
                "'none' with a DP-SGD client: Opacus draws its batches by Poisson sampling, "
                "which an ordered, paced stream would break (and the scores would use private "
                "data outside the accountant)",
            )
        private = dp_client or "user_dp" in scenario.extras
        if private and p.uses_private_scores and not p.allow_private_scoring:
            raise ConfigError(
                "curriculum.allow_private_scoring",
                False,
                "true to opt in: curriculum client selection releases each client's mean "
                "score on its private data to the server, outside the DP accountant (the "
                "opt-in is recorded in summary.json)",
            )
        entry = STRATEGIES.get(scenario.strategy.name, key="strategy.name")
        if p.select and getattr(entry.obj, "driver", None) is not None:
            raise ConfigError(
                "curriculum.select",
                True,
                f"false with strategy '{scenario.strategy.name}', whose own server loop "
                "does not select clients round by round",
            )

    def data_order(self, *, scenario: Any) -> DataCurriculum:
        """The ClientApp-side hook: orders each round's local data (see :class:`DataCurriculum`)."""
        return DataCurriculum(self)


class DataCurriculum:
    """The client half of Curricula in FL (Vahidian et al., ICCV 2023): score, order, pace.

    One lives in each worker's runtime. ``prepare(job)`` scores the client's
    examples and sets ``job.order``; ``finish(job)`` keeps the trained model
    for ``local`` scoring in ``Context.state`` and checks that the local
    optimizer did follow the stream; ``mean_score`` answers the server's
    client-scoring queries.
    """

    def __init__(self, params: CurriculumParams) -> None:
        self.params = params
        self._scratch: nn.Module | None = None
        self._expert: dict[str, torch.Tensor] | None = None
        self._used: list[bool] = []

    def _weights(self, source: str, model: nn.Module, state: Any) -> Any:
        if source == "expert":
            if self._expert is None:
                path = Path(str(self.params.expert_path)).expanduser()
                self._expert = torch.load(path, map_location="cpu", weights_only=True)
            return self._expert
        record = state.get(LOCAL_MODEL_RECORD) if source == "local" else None
        return record.to_torch_state_dict() if record is not None else None

    def scores(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: Any
    ) -> torch.Tensor:
        """Per-example scores under the scoring model(s); ``model`` holds the global weights."""
        p = self.params
        total = torch.zeros(len(x), dtype=torch.float64)
        for source in p.scoring.split("+"):
            weights = self._weights(source, model, state)
            scorer = model
            if weights is not None:
                if self._scratch is None:
                    self._scratch = copy.deepcopy(model)
                load_weights_(self._scratch, weights)
                scorer = self._scratch
            total += example_scores(scorer, x, y, score=p.score, batch_size=p.score_batch_size)
        return total

    def mean_score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: Any) -> float:
        """The client's mean example score (curriculum client selection)."""
        return float(self.scores(model, x, y, state).mean()) if len(x) else 0.0

    def size_at(self, *, steps: int, batch_size: int, n: int) -> Callable[[int], int]:
        """The pacing of a round of ``steps`` local steps on ``n`` examples: t -> prefix size."""
        p = self.params

        def size_at(t: int) -> int:
            return pace(
                p.pacing, t, a=p.pacing_a, b=p.pacing_b, total=steps, n=n, minimum=batch_size
            )

        return size_at

    def prepare(self, job: Any) -> dict[str, float]:
        """Set ``job.order`` to the round's paced stream; return the order's metrics.

        ``order_score_mean`` (the mean score) comes now; once the stream is
        drawn the returned dict also gets ``order_prefix_score`` (the mean score
        of the first pass's prefix: low for easy-first),
        ``order_prefix_class_share`` (the share of the client's classes that
        prefix holds, for class labels), ``curriculum_coverage`` (the last
        pass's prefix over the client's examples), ``curriculum_steps`` (the
        steps drawn) and ``curriculum_step_ratio`` (those over the round's T).
        """
        p = self.params
        if p.ordering == "none":
            return {}
        metrics: dict[str, float] = {}
        self._used = []
        n = len(job.x)
        if p.ordering == "plain":

            def plain(*, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
                self._used.append(True)
                size_at = self.size_at(steps=steps, batch_size=batch_size, n=n)
                count = paced_step_count(
                    steps=steps, batch_size=batch_size, size_at=size_at, finish_pass=p.finish_pass
                )
                metrics["curriculum_coverage"] = 1.0
                metrics["curriculum_steps"] = float(count)
                metrics["curriculum_step_ratio"] = count / steps if steps else 1.0
                return shuffled_batches(n, batch_size, count, job.generator, job.x.device)

            job.order = plain
            return metrics
        scores = (
            torch.zeros(n, dtype=torch.float64)
            if p.ordering == "random"
            else self.scores(job.model, job.x, job.y, job.state)
        )
        order = order_indices(scores, p.ordering, generator=job.generator).to(job.x.device)
        if p.ordering != "random":
            metrics["order_score_mean"] = float(scores.mean()) if n else 0.0

        def stream(*, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
            self._used.append(True)
            size_at = self.size_at(steps=steps, batch_size=batch_size, n=n)
            first = order[: size_at(0)]
            if p.ordering != "random":
                metrics["order_prefix_score"] = float(scores[first.cpu()].mean())
            if job.y.ndim == 1:
                share = len(torch.unique(job.y[first])) / len(torch.unique(job.y))
                metrics["order_prefix_class_share"] = share
            passes: list[int] = []
            batches = paced_batches(
                order,
                steps=steps,
                batch_size=batch_size,
                size_at=size_at,
                generator=job.generator,
                finish_pass=p.finish_pass,
                passes=passes,
            )
            for taken, batch in enumerate(batches, start=1):
                yield batch
                metrics["curriculum_coverage"] = passes[-1] / n
                metrics["curriculum_steps"] = float(taken)
                metrics["curriculum_step_ratio"] = taken / steps

        job.order = stream
        return metrics

    def finish(self, job: Any, update: Any) -> None:
        """Keep the trained model for ``local`` scoring; refuse a silently unordered client.

        A reply that reports ``steps`` > 0 without having drawn the ordered
        stream comes from a local optimizer that ignores ``job.batches``.
        """
        if "local" in self.params.scoring.split("+"):
            job.state.set(LOCAL_MODEL_RECORD, ArrayRecord(job.model.state_dict()))
        trained = float(update.metrics.get("steps", 0)) > 0
        if job.order is not None and trained and not self._used:
            raise RuntimeError(
                "[curriculum] ordering is set but this local optimizer does not train on "
                "job.batches(cfg) (fedopt.training.train_local's stream): it would be unordered"
            )


def train_expert(
    scenario: Any,
    path: str | Path,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> Path:
    """Train the scenario's model centrally on every client's training data; save its state_dict.

    The oracle ``expert`` scoring model of the paper (10 epochs of SGD on the
    pooled training set; its label smoothing is left out). Load it with
    ``[curriculum] scoring = "expert"``, ``expert_path = <path>``.
    """
    from fedopt.task import build_task

    task = build_task(scenario)
    xs, ys = [], []
    for cid in range(task.num_clients):
        train, _ = task.client_data(cid)
        xs.append(torch.from_numpy(train.x))
        ys.append(torch.from_numpy(train.y))
    model = task.new_model()
    cfg = LocalTrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    gen = torch.Generator().manual_seed(scenario.run.seed)
    train_local(model, torch.cat(xs), torch.cat(ys), cfg, generator=gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


SECTIONS.register("curriculum", CurriculumParams)
