"""Name -> implementation registries for every pluggable part of fedopt.

Each registry maps a name to an :class:`Entry`: the implementation (a class or a
factory) and the frozen dataclass of its scenario parameters. Scenario
validation looks names up here, so adding a method never edits a central
if/elif chain: one ``register`` call makes it known to the validator, the CLI
and the contract tests.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedopt.errors import ConfigError, did_you_mean

__all__ = [
    "CLIENTS",
    "CLIENT_MODS",
    "DATASETS",
    "MODELS",
    "OPTIMIZERS",
    "PARTITIONERS",
    "PLOTS",
    "SECTIONS",
    "SPEEDS",
    "STRATEGIES",
    "WRAPPERS",
    "Entry",
    "NoParams",
    "Registry",
    "load_builtins",
]

T = TypeVar("T")


@dataclass(frozen=True)
class NoParams:
    """Parameter class of a component that takes no parameters."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation.

    Attributes
    ----------
    name : str
        The name scenarios use.
    obj : T
        The class or factory.
    params : type
        Frozen dataclass of the component's scenario parameters.
    doc : str
        One line for listings (first docstring line of ``obj`` by default).
    """

    name: str
    obj: T
    params: type = NoParams
    doc: str = ""


class Registry(Generic[T]):
    """A named collection of implementations of one kind.

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages ("strategy", "model").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, obj: T | None = None, *, params: type = NoParams, replace: bool = False
    ) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Raises
        ------
        ValueError
            If ``name`` is taken and ``replace`` is false, or ``params`` is not a dataclass.
        """
        if not dataclasses.is_dataclass(params):
            raise ValueError(f"params for {self.kind} '{name}' must be a dataclass, got {params!r}")

        def add(target: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = Entry(name, target, params, doc[0] if doc else "")
            return target

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in being unloaded, a test cleaning up)."""
        self._entries.pop(name, None)

    def get(self, name: str, *, key: str | None = None) -> Entry[T]:
        """Return the entry for ``name``; unknown names raise :class:`ConfigError`."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none registered"
            raise ConfigError(
                key or self.kind,
                name,
                f"a registered {self.kind}: {known}{did_you_mean(name, self._entries)}",
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
PARTITIONERS: Registry[Callable[..., Any]] = Registry("partitioner")
MODELS: Registry[Callable[..., Any]] = Registry("model")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer")
SPEEDS: Registry[Callable[..., Any]] = Registry("speed model")
CLIENTS: Registry[Any] = Registry("client")
STRATEGIES: Registry[Callable[..., Any]] = Registry("strategy")
SECTIONS: Registry[Any] = Registry("scenario section")
#: ``fn(scenario) -> list of Flower client mods`` for runs whose scenario asks for them
#: (e.g. client-side DP clipping); applied in name order around the ClientApp handlers.
CLIENT_MODS: Registry[Callable[..., Any]] = Registry("client mod")
#: Extra figures of a run: ``fedopt.plots.Figure`` specs drawn after the built-in ones.
PLOTS: Registry[Any] = Registry("plot")
#: ``fn(strategy, *, scenario) -> strategy``: wrap the run's strategy (e.g. server-side DP)
#: when the scenario asks for it; applied in name order after the strategy is built.
WRAPPERS: Registry[Callable[..., Any]] = Registry("strategy wrapper")

_BUILTIN_MODULES = (
    "fedopt.data",
    "fedopt.models",
    "fedopt.training",
    "fedopt.heterogeneity",
    "fedopt.curriculum",
    "fedopt.text",
    "fedopt.pretrain",
    "fedopt.faults",
    "clients",
    "strategies",
    "fedopt.audit",
)


def load_builtins() -> None:
    """Import the modules whose import registers fedopt's built-in components."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
