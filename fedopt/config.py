"""Scenario: the typed, validated, frozen form of a scenario file.

A scenario file is TOML with one table per section::

    name = "quickstart"
    [data]          name = "digits", test_fraction = 0.2, <dataset params>
    [partition]     name = "iid", num_clients = 10, test_fraction = 0.2, <partitioner params>
    [model]         name = "mlp", <model params>
    [heterogeneity] speed = "constant", availability = 1.0, base_rate = 100.0, <speed params>
    [client]        name = "sgd", <local optimizer params: epochs, lr, ...>
    [strategy]      name = "fedavg", <strategy params>
    [run]           rounds, clients_per_round, seed, eval_every, ...

Each section has its own keys plus the parameters of the component it names,
looked up in that component's registry, so a new strategy or client brings its
parameters with its registration. Later features add whole sections with
``SECTIONS.register(name, ParamsClass)``; they land in ``Scenario.extras``.
Everything is checked here, before any engine starts: unknown keys (with a
did-you-mean), wrong types, impossible values and cross-section conflicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedopt import registry as reg
from fedopt.errors import ConfigError, did_you_mean
from fedopt.params import build, check, to_plain

__all__ = [
    "ClientSection",
    "DataSection",
    "HeterogeneitySection",
    "ModelSection",
    "PartitionSection",
    "RunSection",
    "Scenario",
    "StrategySection",
    "apply_overrides",
    "load_scenario",
    "parse_scenario",
]


@dataclass(frozen=True)
class DataSection:
    """Which dataset, and how much of it the server holds out for central evaluation."""

    name: str = "digits"
    test_fraction: float = 0.2
    params: Any = field(default_factory=reg.NoParams)

    def __post_init__(self) -> None:
        check(0.0 < self.test_fraction < 1.0, "test_fraction", self.test_fraction, "0 < x < 1")


@dataclass(frozen=True)
class PartitionSection:
    """How the training pool is split into clients, and each client's own test share."""

    name: str = "iid"
    num_clients: int = 10
    test_fraction: float = 0.2
    params: Any = field(default_factory=reg.NoParams)

    def __post_init__(self) -> None:
        check(self.num_clients >= 1, "num_clients", self.num_clients, "an integer >= 1")
        check(0.0 <= self.test_fraction < 1.0, "test_fraction", self.test_fraction, "0 <= x < 1")


@dataclass(frozen=True)
class ModelSection:
    """A registered model name or ``"package.module:factory"``, plus its parameters."""

    name: str = "mlp"
    params: Any = field(default_factory=reg.NoParams)


@dataclass(frozen=True)
class HeterogeneitySection:
    """System heterogeneity: client speeds, availability, and the clock's unit of work."""

    speed: str = "constant"
    availability: float = 1.0
    base_rate: float = 100.0
    params: Any = field(default_factory=reg.NoParams)

    def __post_init__(self) -> None:
        check(0.0 < self.availability <= 1.0, "availability", self.availability, "0 < p <= 1")
        check(self.base_rate > 0.0, "base_rate", self.base_rate, "examples per second > 0")


@dataclass(frozen=True)
class ClientSection:
    """The local optimizer clients run, and its parameters."""

    name: str = "sgd"
    params: Any = None


@dataclass(frozen=True)
class StrategySection:
    """The server strategy, and its parameters."""

    name: str = "fedavg"
    params: Any = field(default_factory=reg.NoParams)


#: Values of ``run.pack``.
PACK_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class RunSection:
    """Rounds, sampling, evaluation, seeds and the resources of the simulation engine.

    ``clients_per_round`` and ``fed_eval_clients`` default to every client.
    ``min_replies`` is the fewest successful replies a round may aggregate.
    ``num_cpus`` and ``num_gpus`` are the Ray resources of one client; a GPU
    fraction below 1 lets several clients share a GPU. ``workers`` caps the
    number of concurrent client workers of a local Ray (default: one per core).
    ``connect_timeout`` bounds the check that ``ray_address`` answers, made
    before the engine starts (:mod:`fedopt.ray_address`).

    ``pack`` packs virtual clients: ``"on"`` runs the federation on
    ``pack_nodes`` Flower nodes (default: one per Ray worker, at most
    ``sum_groups``), each hosting the clients of whole sum groups (client
    ``cid`` is in group ``cid % sum_groups``, on node ``group % pack_nodes``)
    and training its selected ones back to back from one message per round;
    ``"off"`` gives every client its own node and message (per-client
    fidelity: a dying worker loses one client, not a pack); ``"auto"`` packs
    when there are more clients than nodes and no worker crashes are
    injected. Results are identical either way.
    ``partial_sums`` (for strategies whose aggregate is the example-weighted
    mean then a server step: fedavg, fedprox, fedavgm, fedadam, fedyogi,
    fedadagrad) sends each node's models summed per sum group instead of one
    model per client, and takes the mean in float64 in a fixed order
    (:mod:`fedopt.partial`): results do not depend on the number of nodes or
    workers, and differ from Flower's own float32 aggregation
    (``partial_sums = false``) by float rounding only.
    ``vectorize`` trains a pack's clients at once (one batched step for all,
    :mod:`fedopt.vectorized`) when the local optimizer can (SGD, with
    momentum and clipping): the same arithmetic batched, so results agree
    with client-by-client training to float rounding but not bitwise.
    ``checkpoint_every`` writes a checkpoint every k rounds (0: only when the
    run is stopped by Ctrl-C or SIGTERM); ``"auto"`` writes one after round 1
    and then as often as keeps checkpoints under 5% of the run's time, from
    the cost of the last one and the recent rounds
    (:class:`fedopt.resumable.Cadence`). ``diverge_factor`` and
    ``diverge_rounds`` stop a run whose loss stays above ``diverge_factor``
    times max(its first loss, 1) for ``diverge_rounds`` rounds in a row (the
    training loss, else the central test loss; 0 turns the rule off; see
    :mod:`fedopt.divergence`); a non-finite loss always stops it.
    """

    rounds: int = 10
    clients_per_round: int | None = None
    min_replies: int = 1
    seed: int = 0
    eval_every: int = 1
    fed_eval_every: int = 1
    fed_eval_clients: int | None = None
    num_cpus: int = 1
    num_gpus: float = 0.0
    workers: int | None = None
    ray_address: str | None = None
    connect_timeout: float = 15.0
    timeout: float = 3600.0
    pack: str = "auto"
    pack_nodes: int | None = None
    partial_sums: bool = True
    sum_groups: int = 64
    vectorize: bool = False
    checkpoint_every: int | Literal["auto"] = 10
    diverge_factor: float = 10.0
    diverge_rounds: int = 3

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        cpr = self.clients_per_round
        check(cpr is None or cpr >= 1, "clients_per_round", cpr, "an integer >= 1 or omitted")
        check(self.min_replies >= 1, "min_replies", self.min_replies, "an integer >= 1")
        check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "an integer >= 0 (0: never)")
        check(self.fed_eval_every >= 0, "fed_eval_every", self.fed_eval_every, "an integer >= 0")
        fec = self.fed_eval_clients
        check(fec is None or fec >= 1, "fed_eval_clients", fec, "an integer >= 1 or omitted")
        check(self.num_cpus >= 1, "num_cpus", self.num_cpus, "an integer >= 1")
        check(0.0 <= self.num_gpus, "num_gpus", self.num_gpus, "a GPU fraction >= 0")
        check(self.timeout > 0, "timeout", self.timeout, "seconds > 0")
        ct = self.connect_timeout
        check(0 < ct < math.inf, "connect_timeout", ct, "seconds > 0 (finite)")
        w = self.workers
        check(w is None or w >= 1, "workers", w, "an integer >= 1 or omitted")
        check(self.pack in PACK_MODES, "pack", self.pack, " | ".join(map(repr, PACK_MODES)))
        pn = self.pack_nodes
        check(pn is None or pn >= 1, "pack_nodes", pn, "an integer >= 1 or omitted")
        check(self.sum_groups >= 1, "sum_groups", self.sum_groups, "an integer >= 1")
        ce = self.checkpoint_every
        check(
            ce == "auto" or (isinstance(ce, int) and ce >= 0),
            "checkpoint_every",
            ce,
            'an integer >= 0 (0: only on a stop signal) or "auto"',
        )
        df = self.diverge_factor
        check(0.0 <= df < math.inf, "diverge_factor", df, "a finite number >= 0 (0: off)")
        check(self.diverge_rounds >= 1, "diverge_rounds", self.diverge_rounds, "an integer >= 1")


@dataclass(frozen=True)
class _Spec:
    """How one section is parsed: its own keys, and where its component lives."""

    cls: type
    registry: reg.Registry[Any] | None
    name_key: str = "name"


_SPECS: dict[str, _Spec] = {
    "data": _Spec(DataSection, reg.DATASETS),
    "partition": _Spec(PartitionSection, reg.PARTITIONERS),
    "model": _Spec(ModelSection, reg.MODELS),
    "heterogeneity": _Spec(HeterogeneitySection, reg.SPEEDS, "speed"),
    "client": _Spec(ClientSection, reg.CLIENTS),
    "strategy": _Spec(StrategySection, reg.STRATEGIES),
    "run": _Spec(RunSection, None),
}


@dataclass(frozen=True)
class Scenario:
    """A complete, validated experiment description.

    Build one with :func:`load_scenario` (a TOML file) or :func:`parse_scenario`
    (a mapping), never field by field: those check every key and value.
    """

    name: str
    data: DataSection
    partition: PartitionSection
    model: ModelSection
    heterogeneity: HeterogeneitySection
    client: ClientSection
    strategy: StrategySection
    run: RunSection
    extras: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round (all clients when the scenario does not say)."""
        return self.run.clients_per_round or self.partition.num_clients

    def to_dict(self) -> dict[str, Any]:
        """Plain, TOML-ready form; ``parse_scenario(s.to_dict()) == s``."""
        out: dict[str, Any] = {"name": self.name}
        for section in _SPECS:
            value = getattr(self, section)
            plain = to_plain(
                {
                    f.name: getattr(value, f.name)
                    for f in dataclasses.fields(value)
                    if f.name != "params"
                }
            )
            plain.update(to_plain(getattr(value, "params", None)) or {})
            out[section] = plain
        for key, value in self.extras.items():
            out[key] = to_plain(value)
        return out

    def fingerprint(self) -> str:
        """A short stable hash of the resolved scenario."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()  # TOML dates
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **sets: Any) -> Scenario:
        """Return a re-validated copy with dotted-key overrides, e.g. ``{"run.seed": 1}``."""
        raw = self.to_dict()
        for key, value in sets.items():
            _set_dotted(raw, key, value)
        return parse_scenario(raw)


def _parse_section(where: str, spec: _Spec, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, "a table of keys")
    own = {f.name for f in dataclasses.fields(spec.cls)} - {"params"}
    common = {k: v for k, v in raw.items() if k in own}
    rest = {k: v for k, v in raw.items() if k not in own}
    section = build(spec.cls, common, where)
    if spec.registry is None:
        if rest:
            key = next(iter(rest))
            hint = did_you_mean(key, own)
            raise ConfigError(
                f"{where}.{key}", rest[key], f"a known key ({', '.join(sorted(own))}){hint}"
            )
        return section
    name = getattr(section, spec.name_key)
    if where == "model" and ":" in name:
        return dataclasses.replace(section, params=types.MappingProxyType(dict(rest)))
    entry = spec.registry.get(name, key=f"{where}.{spec.name_key}")
    allowed = own | {f.name for f in dataclasses.fields(entry.params)}
    for key in rest:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise ConfigError(
                f"{where}.{key}",
                rest[key],
                f"a key of [{where}] with {spec.name_key} = {name!r} "
                f"({', '.join(sorted(allowed))}){hint}",
            )
    return dataclasses.replace(section, params=build(entry.params, rest, where))


def parse_scenario(raw: Mapping[str, Any]) -> Scenario:
    """Validate a scenario mapping (the parsed TOML) into a :class:`Scenario`.

    Raises
    ------
    ConfigError
        For the first problem found, naming the dotted key, the value and what is allowed.
    """
    reg.load_builtins()
    if not isinstance(raw, Mapping):
        raise ConfigError("scenario", raw, "a table of sections")
    known = {"name", *_SPECS, *reg.SECTIONS.names()}
    for key in raw:
        if key not in known:
            raise ConfigError(
                key,
                raw[key],
                f"a scenario section ({', '.join(sorted(known))}){did_you_mean(key, known)}",
            )
    name = raw.get("name", "scenario")
    check(isinstance(name, str) and name.strip() != "", "name", name, "a non-empty string")
    check(
        all(c.isalnum() or c in "-_." for c in name) and name.strip(".") != "",
        "name",
        name,
        "letters, digits, '-', '_' and '.', not only dots (it names the run directory)",
    )
    sections = {w: _parse_section(w, spec, raw.get(w, {})) for w, spec in _SPECS.items()}
    extras = {
        key: build(reg.SECTIONS.get(key).obj, raw[key], key)
        for key in reg.SECTIONS.names()
        if key in raw
    }
    scenario = Scenario(name=name, extras=types.MappingProxyType(extras), **sections)
    _cross_check(scenario)
    return scenario


def _cross_check(s: Scenario) -> None:
    n = s.partition.num_clients
    cpr = s.run.clients_per_round
    if cpr is not None and cpr > n:
        raise ConfigError("run.clients_per_round", cpr, f"at most partition.num_clients = {n}")
    if s.run.min_replies > s.clients_per_round:
        raise ConfigError(
            "run.min_replies",
            s.run.min_replies,
            f"at most the {s.clients_per_round} clients per round",
        )
    fec = s.run.fed_eval_clients
    if fec is not None and fec > n:
        raise ConfigError("run.fed_eval_clients", fec, f"at most partition.num_clients = {n}")
    check_client = getattr(
        reg.CLIENTS.get(s.client.name, key="client.name").obj, "check_scenario", None
    )
    if check_client is not None:
        check_client(s)
    check_strategy = getattr(
        reg.STRATEGIES.get(s.strategy.name, key="strategy.name").obj, "check_scenario", None
    )
    if check_strategy is not None:
        check_strategy(s)
    for key in s.extras:  # registered sections may check the scenario around them too
        check_section = getattr(reg.SECTIONS.get(key).obj, "check_scenario", None)
        if check_section is not None:
            check_section(s)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # bad TOML, a 5000-digit integer, deep nesting
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ConfigError("--set", key, "a dotted key such as run.rounds or strategy.name")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("--set", key, f"a key inside a table; {part!r} is a value")
        node = child
    node[parts[-1]] = value


def _copy_tables(value: Any) -> Any:
    """Deep copy with plain dicts and lists (TOML dates and times pass through)."""
    if isinstance(value, Mapping):
        return {k: _copy_tables(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_tables(v) for v in value]
    return value


def apply_overrides(raw: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values in TOML syntax, bare words as strings).

    Examples
    --------
    >>> apply_overrides({"run": {"rounds": 5}}, ["run.rounds=2", "strategy.name=fedprox"])
    {'run': {'rounds': 2}, 'strategy': {'name': 'fedprox'}}
    """
    out = _copy_tables(raw)
    for item in sets:
        if "=" not in item:
            raise ConfigError("--set", item, "key=value, e.g. run.rounds=20")
        key, text = item.split("=", 1)
        _set_dotted(out, key.strip(), _parse_value(text.strip()))
    return out


#: The largest scenario or sweep file read (a scenario is a few KB; this refuses /dev/zero).
MAX_TOML_BYTES = 1 << 20


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing, unreadable, oversized file or bad syntax is a ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("scenario", str(path), "an existing TOML file") from None
    except OSError as err:  # a directory, no permission
        raise ConfigError("scenario", str(path), f"a readable file ({err.strerror})") from None
    except ValueError as err:  # an embedded null byte
        raise ConfigError("scenario", str(path), f"a file path ({err})") from None
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError("scenario", str(path), f"a TOML file of at most {MAX_TOML_BYTES} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad syntax or UTF-8, huge integer, deep nesting
        raise ConfigError("scenario", str(path), f"valid TOML ({err})") from None


def load_scenario(path: str | Path, sets: Sequence[str] = ()) -> Scenario:
    """Read, override and validate a scenario file; an empty file is refused.

    An empty file would silently run every default, which is almost always a
    wrong path or an unsaved editor buffer rather than intent.
    """
    raw = read_toml(path)
    if not raw:
        raise ConfigError(
            "scenario",
            str(path),
            "a scenario with at least one key (it is empty; start from scenarios/quickstart.toml)",
        )
    return parse_scenario(apply_overrides(raw, sets))
