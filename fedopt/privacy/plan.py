"""Sample-level DP-SGD settings, each client's step plan, and its persistent privacy ledger.

Both halves of DP-SGD read these: the client (``clients/dpsgd.py``) trains
and accounts with them, the server-side report (``strategies/dp.py``) records
the plan in the summary. A client's ledger is a plain ConfigRecord in its
``Context.state``: the rounds it joined and, per round, σ, q and the noisy
steps it actually took, which is everything a third party needs to recompute
its ε with Opacus or dp-accounting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from flwr.app import ConfigRecord

from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.privacy.accountants import Accountant, check_accountant_name, make_accountant
from fedopt.privacy.secrecy import check_noise_mode
from fedopt.training import LocalTrainConfig

__all__ = [
    "EXPECTED",
    "DPSGDParams",
    "Ledger",
    "expected_participations",
    "local_plan",
    "planned_participations",
    "resolve_participations",
    "sigma_request",
]

#: ``max_participations = "expected"``: plan for a client's expected share of the rounds.
EXPECTED = "expected"


@dataclass(frozen=True)
class DPSGDParams(LocalTrainConfig):
    """DP-SGD (Abadi et al. 2016) local training: Opacus clipping, noise and accounting.

    Attributes
    ----------
    max_grad_norm : float
        Per-sample clipping bound C (required: DP-SGD always clips).
    noise_multiplier : float or None
        σ; omitted means: calibrate it per client for ``target_epsilon``.
    target_epsilon : float
        The per-client budget (default 8). With σ omitted, σ is calibrated so
        that the planned worst-case participation spends at most this; with σ
        given, it is a cap. A client whose next round would pass it stops
        training. Not used when ``non_private`` is set.
    delta : float
        δ of every reported ε. It must be below 1/n_min, n_min the smallest
        client's number of training examples (checked before a run starts,
        :mod:`fedopt.privacy.preflight`): a δ of 1/n or more allows a mechanism
        that publishes one of the n examples outright with probability δ.
    allow_large_delta : bool
        Explicit opt-in to a δ of 1/n_min or more (e.g. to reproduce a paper
        that used one); summary.json records it. Off by default.
    accountant : str
        A registered accountant (``rdp``, ``prv``, ``gdp``, ``pld``).
    max_participations : int, "expected" or None
        The plan: rounds a client may train in (default: every round, the
        worst case of ``run.rounds``). Calibration assumes this many
        participations of the local steps each. ``"expected"`` plans, as
        FedSVD's code does, for a client's expected participations under
        uniform client sampling, ceil(rounds · m / N) with m =
        ``run.clients_per_round`` and N = ``partition.num_clients``
        (:func:`expected_participations`). Either way the guarantee stays
        honest: a client whose next round would pass ``target_epsilon`` (the
        budget this plan spends) does not train.
    max_physical_batch_size : int or None
        Split each Poisson batch into physical batches of at most this size
        (Opacus's ``BatchMemoryManager``); one logical step still counts once.
    fix_model : bool
        Let Opacus's ``ModuleValidator.fix`` replace layers it cannot train
        (BatchNorm -> GroupNorm) in the model everywhere (server and clients).
    non_private : bool
        Explicit opt-in to σ = 0: clipping and Poisson sampling without noise,
        and no ε (the run is not private).
    noise : {"secret", "replayable"}
        Where the Poisson masks and the noise come from
        (:mod:`fedopt.privacy.secrecy`): a per-run key from OS entropy
        (default: the guarantee survives anyone reading the run directory
        without its checkpoints) or ``run.seed`` (bitwise replayable runs; the
        guarantee holds only against a party without the seed).
    release_train_metrics : bool
        Explicit opt-in to send the un-noised training loss, accuracy and the
        number of examples actually sampled with each reply. They are computed
        on the private batches and not accounted; summary.json records the
        release. Off by default: a reply then carries only the noised update,
        the example count and the ledger fields the accountant needs.
    """

    max_grad_norm: float | None = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    allow_large_delta: bool = False
    accountant: str = "rdp"
    max_participations: int | Literal["expected"] | None = None
    max_physical_batch_size: int | None = None
    fix_model: bool = False
    non_private: bool = False
    noise: str = "secret"
    release_train_metrics: bool = False

    def __post_init__(self) -> None:
        c = self.max_grad_norm
        check(
            c is not None and 0.0 < c < math.inf,
            "max_grad_norm",
            c,
            "a finite number > 0: the per-sample clipping bound C",
        )
        super().__post_init__()
        sigma, target = self.noise_multiplier, self.target_epsilon
        check(
            sigma is None or 0.0 <= sigma < math.inf,
            "noise_multiplier",
            sigma,
            "a finite number >= 0, or omitted to calibrate it for target_epsilon",
        )
        check(
            target is None or 0.0 < target < math.inf,
            "target_epsilon",
            target,
            "a finite number > 0, or omitted",
        )
        check(0.0 < self.delta < 1.0, "delta", self.delta, "a probability 0 < δ < 1")
        check_accountant_name(self.accountant)
        check_noise_mode(self.noise)
        mp = self.max_participations
        check(
            mp is None or mp == EXPECTED or (isinstance(mp, int) and mp >= 1),
            "max_participations",
            mp,
            f"an integer >= 1, {EXPECTED!r} or omitted",
        )
        pb = self.max_physical_batch_size
        check(pb is None or pb >= 1, "max_physical_batch_size", pb, "an integer >= 1 or omitted")
        check(
            self.lr_schedule == "constant",
            "lr_schedule",
            self.lr_schedule,
            "'constant' for DP-SGD clients (their Opacus optimizer steps at one rate)",
        )
        if self.non_private:
            check(not sigma, "noise_multiplier", sigma, "omitted or 0 when non_private = true")
            return
        check(
            sigma is None or sigma > 0.0,
            "noise_multiplier",
            sigma,
            "a number > 0 (σ = 0 is not private: set non_private = true to run without noise)",
        )
        check(
            sigma is not None or target is not None,
            "target_epsilon",
            None,
            "a budget ε > 0, or give noise_multiplier (or set non_private = true)",
        )

    def planned_work(self, n: int) -> float:
        """Expected examples of one round's τ Poisson steps (see :meth:`expected_work`)."""
        return self.expected_work(n, steps=local_plan(self, n)[1]) if n > 0 else 0.0

    def expected_work(self, n: int, *, steps: int) -> float:
        """Examples ``steps`` Poisson batches of mean q·n = n / ceil(n / batch_size) process.

        The simulated clock charges a DP-SGD client this public quantity (n, q
        and the steps are in its ledger) rather than the examples it actually
        sampled, which depend on its private Poisson masks. An epoch of steps
        is exactly n.
        """
        if n <= 0:
            return 0.0
        return float(steps * n) / max(1, math.ceil(n / self.batch_size))


def local_plan(params: DPSGDParams, num_examples: int) -> tuple[float, int]:
    """(q, τ): a client's Poisson rate and its logical steps per round.

    As Opacus's ``DPDataLoader``: q = 1 / ceil(n / batch_size), one pass is
    ceil(n / batch_size) steps; τ is ``steps`` when set, else epochs passes.
    """
    per_pass = max(1, math.ceil(num_examples / params.batch_size))
    tau = params.steps if params.steps is not None else params.epochs * per_pass
    return 1.0 / per_pass, int(tau)


def expected_participations(*, rounds: int, clients_per_round: int, num_clients: int) -> int:
    """ceil(rounds · m / N): a client's expected rounds when m of N clients are drawn uniformly.

    Integer arithmetic, so e.g. 20 rounds of 3 of 6 clients give exactly 10.
    """
    check(num_clients >= 1, "partition.num_clients", num_clients, "an integer >= 1")
    check(
        1 <= clients_per_round <= num_clients,
        "run.clients_per_round",
        clients_per_round,
        f"an integer in 1..{num_clients}",
    )
    return -(-rounds * clients_per_round // num_clients)


def planned_participations(
    params: DPSGDParams,
    rounds: int,
    *,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
) -> int:
    """The participations calibration plans for: the cap, the expected count, or every round.

    Raises
    ------
    ConfigError
        Under ``client.max_participations`` for ``"expected"`` when the caller
        does not pass ``clients_per_round`` and ``num_clients``.
    """
    cap = params.max_participations
    if cap == EXPECTED:
        if clients_per_round is None or num_clients is None:
            raise ConfigError(
                "client.max_participations",
                cap,
                "an integer here: resolving 'expected' needs run.clients_per_round and "
                "partition.num_clients, which this caller does not pass",
            )
        cap = expected_participations(
            rounds=rounds, clients_per_round=clients_per_round, num_clients=num_clients
        )
    return min(cap or rounds, rounds)


def sigma_request(
    params: DPSGDParams,
    *,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    clients_per_round: int | None = None,
    num_clients: int | None = None,
) -> dict[str, Any]:
    """What σ is calibrated for: the keyword arguments of ``calibrate_noise``.

    One client's plan (rate q, τ local steps) over its planned participations
    of ``rounds`` (:func:`planned_participations`; ``clients_per_round`` and
    ``num_clients`` resolve ``max_participations = "expected"``); the client
    calibrates with it and the pre-run check asks the same question, so both
    always agree.
    """
    planned = planned_participations(
        params, rounds, clients_per_round=clients_per_round, num_clients=num_clients
    )
    return {
        "target_epsilon": float(params.target_epsilon),
        "delta": params.delta,
        "sample_rate": sample_rate,
        "steps": planned * local_steps,
        "accountant": params.accountant,
        "key": "client.target_epsilon",
    }


def resolve_participations(params: DPSGDParams, scenario: Any) -> DPSGDParams:
    """``params`` with ``max_participations = "expected"`` replaced by its count for ``scenario``.

    Other values come back unchanged; the count is
    :func:`expected_participations` of the scenario's rounds, clients per
    round and clients (at most the rounds).
    """
    if params.max_participations != EXPECTED:
        return params
    count = planned_participations(
        params,
        scenario.run.rounds,
        clients_per_round=scenario.clients_per_round,
        num_clients=scenario.partition.num_clients,
    )
    return dataclasses.replace(params, max_participations=count)


class Ledger:
    """One client's privacy history, stored as a ConfigRecord in its ``Context.state``.

    Parameters
    ----------
    record : ConfigRecord or None
        A stored ledger, or None for a client that never trained.
    """

    NAME = "dp-ledger"

    def __init__(self, record: ConfigRecord | None = None) -> None:
        rec: Any = record or {}
        self.sigma: float | None = float(rec["sigma"]) if "sigma" in rec else None
        self.rounds: list[int] = [int(v) for v in rec.get("rounds", [])]
        self.noise: list[float] = [float(v) for v in rec.get("noise", [])]
        self.rates: list[float] = [float(v) for v in rec.get("rates", [])]
        self.steps: list[int] = [int(v) for v in rec.get("steps", [])]

    def record(
        self, *, server_round: int, noise_multiplier: float, rate: float, steps: int
    ) -> None:
        """Add one participation."""
        self.rounds.append(int(server_round))
        self.noise.append(float(noise_multiplier))
        self.rates.append(float(rate))
        self.steps.append(int(steps))

    @property
    def total_steps(self) -> int:
        """Noisy steps over every participation."""
        return sum(self.steps)

    def history(self) -> list[tuple[float, float, int]]:
        """``(σ, q, steps)`` per participation."""
        return list(zip(self.noise, self.rates, self.steps, strict=True))

    def accountant(self, name: str) -> Accountant:
        """A ``name`` accountant holding this whole history."""
        return make_accountant(name, history=[h for h in self.history() if h[2] > 0])

    def to_record(self) -> ConfigRecord:
        """The ledger as a ConfigRecord (lists of plain numbers)."""
        rec: dict[str, Any] = {}
        if self.sigma is not None:
            rec["sigma"] = float(self.sigma)
        if self.rounds:
            rec.update(rounds=self.rounds, noise=self.noise, rates=self.rates, steps=self.steps)
        return ConfigRecord(rec)
