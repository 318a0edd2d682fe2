"""The privacy-accountant interface, its registry, and the history every accountant composes.

An accountant composes Poisson-subsampled Gaussian mechanisms: each call of
:meth:`Accountant.step` records ``num_steps`` releases with noise multiplier
σ at sampling rate q, and :meth:`Accountant.get_epsilon` turns the whole
history into ε at a given δ. The history is a plain list of ``(σ, q, steps)``
triples (consecutive identical ``(σ, q)`` entries merged, as Opacus does), so
it can be stored anywhere (a client's ``Context.state``, a summary file) and
replayed by a third party with Opacus or dp-accounting.

ε is never negative: at a large δ an accountant's formula can give ε < 0 (the
mechanism loses nothing beyond δ itself), and :meth:`Accountant.get_epsilon`
reports that as 0.0. Whatever a library raises while computing ε (a root
bracket that fails, an array too large to allocate) comes out as one
:class:`PrivacyError` naming the history and δ; numerical accountants refuse a
history whose grid would exceed :data:`MAX_GRID_POINTS` before allocating it.

Implementations are registered by name in :data:`ACCOUNTANTS`
(``rdp``, ``prv``, ``gdp`` from Opacus, ``pld`` from dp-accounting); users add
their own with :func:`register_accountant`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedopt.errors import ConfigError, FedoptError, did_you_mean
from fedopt.registry import Registry

__all__ = [
    "ACCOUNTANTS",
    "MAX_GRID_POINTS",
    "Accountant",
    "History",
    "PrivacyError",
    "accountant_names",
    "check_accountant_name",
    "check_grid",
    "describe",
    "make_accountant",
    "register_accountant",
]

History = list[tuple[float, float, int]]

#: Accountants by name; ``make_accountant(name)`` builds one.
ACCOUNTANTS: Registry[type] = Registry("accountant")

#: Largest discretisation grid (points) a numerical accountant (``prv``, ``pld``) may build:
#: 2**25 points are 256 MiB of float64 (512 MiB as complex128, for the FFT).
MAX_GRID_POINTS = 2**25

#: What a library may raise on a history it cannot handle (turned into PrivacyError).
_LIBRARY_ERRORS = (ValueError, ArithmeticError, MemoryError)


class PrivacyError(FedoptError, ValueError):
    """A privacy computation that cannot be done as asked (e.g. σ = 0, a changing history)."""


def describe(history: History) -> str:
    """A history in words: ``σ = 1, q = 0.01, 500 steps`` (entries joined by ``; ``)."""
    return "; ".join(f"σ = {s:g}, q = {q:g}, {n} steps" for s, q, n in history)


def check_grid(
    accountant: str, points: float, history: History, *, limit: int = MAX_GRID_POINTS
) -> None:
    """Refuse a grid of more than ``limit`` points, before it is allocated.

    Raises
    ------
    PrivacyError
        Naming the accountant, the grid's size and memory, and the history.
    """
    if points > limit:
        gib = points * 8 / 2**30
        raise PrivacyError(
            f"the {accountant} accountant would need a grid of {points:.3g} points "
            f"({gib:.3g} GiB per array, limit {limit:.3g} points) for "
            f"{describe(history)}: use the rdp accountant for this plan"
        )


def _check_step(noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyError(
            f"noise_multiplier = {noise_multiplier!r}: an accountant needs σ > 0 "
            "(σ = 0 releases the data with no finite ε)"
        )
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(f"sample_rate = {sample_rate!r}: a probability in (0, 1]")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 0:
        raise PrivacyError(f"num_steps = {num_steps!r}: an integer >= 0")


class Accountant(ABC):
    """Composition of Poisson-subsampled Gaussian steps, reported as (ε, δ)-DP.

    Subclasses implement :meth:`_epsilon` from the history; this base keeps the
    history, merges repeated entries, and (de)serialises it. Every numeric
    argument is keyword-only, so σ and q cannot be swapped by position.
    """

    #: The registered name of the accountant (recorded in ``state_dict``).
    name: ClassVar[str] = ""
    #: ε never grows with σ and never shrinks as q grows (steps fixed): true of the
    #: subsampled Gaussian under ``rdp``, ``gdp`` and ``pld``, not of ``prv``'s numerical
    #: upper bound (its error term moves with the grid). It lets
    #: :func:`fedopt.privacy.calibration.check_reachable` decide from one ε and bound it
    #: in q; otherwise that check runs the whole search. A user's accountant is not
    #: assumed to be monotone.
    monotone: ClassVar[bool] = False

    def __init__(self) -> None:
        self._history: History = []

    @property
    def history(self) -> History:
        """The ``(σ, q, steps)`` entries so far (a copy)."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of noisy steps composed so far."""
        return sum(n for _, _, n in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases with noise multiplier σ at Poisson rate q."""
        _check_step(noise_multiplier, sample_rate, num_steps)
        if num_steps == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + int(num_steps))
        else:
            self._history.append((sigma, q, int(num_steps)))

    def get_epsilon(self, delta: float) -> float:
        """ε of everything composed so far, at ``delta`` (0 before any step); never below 0.

        A negative ε from the accountant's formula (which happens at a large δ,
        e.g. 0.5) means the history loses nothing beyond δ, and is reported as 0.0.

        Raises
        ------
        PrivacyError
            For δ outside (0, 1), or when the accountant cannot compute ε for
            this history (the library's own error, naming the history and δ).
        """
        if not 0.0 < delta < 1.0:
            raise PrivacyError(f"delta = {delta!r}: a probability in (0, 1)")
        if not self._history:
            return 0.0
        history = self.history
        try:
            with warnings.catch_warnings():  # the libraries' numerical remarks, not errors
                warnings.simplefilter("ignore")
                eps = float(self._epsilon(history, float(delta)))
        except PrivacyError:
            raise
        except _LIBRARY_ERRORS as err:
            raise PrivacyError(
                f"the {self.name} accountant failed for {describe(history)} at "
                f"δ = {delta:g}: {type(err).__name__}: {err}"
            ) from None
        if math.isnan(eps):
            raise PrivacyError(
                f"the {self.name} accountant gave no ε (NaN) for {describe(history)} "
                f"at δ = {delta:g}"
            )
        return eps if eps > 0.0 else 0.0

    @abstractmethod
    def _epsilon(self, history: History, delta: float) -> float:
        """ε of a non-empty history at ``delta``."""

    def calibrate(
        self,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        steps: int,
        tolerance: float,
    ) -> float | None:
        """σ for a target, when the accountant's library has its own helper; else None.

        :func:`fedopt.privacy.calibration.calibrate_noise` bisects when this returns None.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain state: ``{"accountant": name, "history": [[σ, q, steps], ...]}``."""
        return {"accountant": self.name, "history": [[s, q, n] for s, q, n in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (of an accountant of the same name)."""
        name = state.get("accountant", self.name)
        if name != self.name:
            raise PrivacyError(f"a '{name}' accountant's state cannot load into '{self.name}'")
        self._history = []
        for entry in state.get("history", []):
            sigma, q, n = entry
            self.step(noise_multiplier=float(sigma), sample_rate=float(q), num_steps=int(n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self._history})"


def register_accountant(name: str, cls: type, *, replace: bool = False) -> type:
    """Register an :class:`Accountant` subclass under ``name``; returns ``cls``.

    Raises
    ------
    TypeError
        If ``cls`` is not an Accountant subclass.
    ValueError
        If the name is taken and ``replace`` is false.
    """
    if not (isinstance(cls, type) and issubclass(cls, Accountant)):
        raise TypeError(f"accountant '{name}' must be an Accountant subclass, got {cls!r}")
    if cls.name != name:
        cls.name = name
    ACCOUNTANTS.register(name, cls, replace=replace)
    return cls


def accountant_names() -> list[str]:
    """The registered accountant names, sorted."""
    return ACCOUNTANTS.names()


def make_accountant(
    name: str, *, history: Sequence[Sequence[float]] = (), key: str = "accountant"
) -> Accountant:
    """A new accountant registered as ``name``, optionally holding ``history``.

    Raises
    ------
    ConfigError
        Under ``key`` for an unknown name, listing the registered ones.
    """
    acc = ACCOUNTANTS.get(name, key=key).obj()
    for sigma, q, n in history:
        acc.step(noise_multiplier=float(sigma), sample_rate=float(q), num_steps=int(n))
    return acc


def check_accountant_name(name: str, key: str = "accountant") -> None:
    """Raise :class:`ConfigError` (bare key, for ``__post_init__``) unless ``name`` is known."""
    if name not in ACCOUNTANTS:
        known = ", ".join(ACCOUNTANTS.names())
        raise ConfigError(
            key, name, f"a registered accountant: {known}{did_you_mean(name, ACCOUNTANTS.names())}"
        )
