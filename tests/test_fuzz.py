"""Hostile scenarios: random and mutated input gives a Scenario or a named ConfigError.

Property-based (hypothesis, derandomized: every run draws the same examples). Random
TOML tables, and the shipped scenarios and sweeps with keys dropped, retyped, pushed
out of range, misspelt, or switched to any registered component with its parameters,
must validate to a :class:`~fedopt.config.Scenario` (or a sweep) or raise
:class:`~fedopt.errors.ConfigError` naming a key, in one line, never another
exception. Validation only: no data is loaded and nothing trains.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import tomllib
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedopt import registry as reg
from fedopt.cli import main
from fedopt.compare import Sweep, load_sweep, merge
from fedopt.config import Scenario, apply_overrides, load_scenario, parse_scenario, read_toml
from fedopt.errors import ConfigError
from fedopt.privacy import ACCOUNTANTS

ROOT = Path(__file__).resolve().parents[1]
reg.load_builtins()

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)

#: Section -> (registry of its component, the key that names the component).
COMPONENTS = {
    "data": (reg.DATASETS, "name"),
    "partition": (reg.PARTITIONERS, "name"),
    "model": (reg.MODELS, "name"),
    "heterogeneity": (reg.SPEEDS, "speed"),
    "client": (reg.CLIENTS, "name"),
    "strategy": (reg.STRATEGIES, "name"),
}
SECTION_CLASSES = get_type_hints(Scenario)
OWN = {
    section: {
        f.name: get_type_hints(SECTION_CLASSES[section])[f.name]
        for f in dataclasses.fields(SECTION_CLASSES[section])
        if f.name != "params"
    }
    for section in [*COMPONENTS, "run"]
}
EXTRAS = reg.SECTIONS.names()
SECTIONS = ["name", *OWN, *EXTRAS]
SWEEP_KEYS = ["name", "base", "seeds", "target_accuracy", "columns", "scenario"]


def params_hints(section: str, name: Any) -> dict[str, Any]:
    """Annotations of the parameters ``[section]`` takes with component ``name``."""
    if section in COMPONENTS:
        registry = COMPONENTS[section][0]
        ok = isinstance(name, str) and name in registry
        return get_type_hints(registry.get(name).params) if ok else {}
    return get_type_hints(reg.SECTIONS.get(section).obj)


REGISTERED = sorted({n for r, _ in COMPONENTS.values() for n in r.names()})
ALL_KEYS = sorted(
    {k for s in OWN for k in OWN[s]}
    | {k for s, (r, _) in COMPONENTS.items() for n in r.names() for k in params_hints(s, n)}
    | {k for s in EXTRAS for k in params_hints(s, None)}
    | {*SECTIONS, *SWEEP_KEYS, "label", "strategies", "settings"}
)

# ---------------------------------------------------------------- values of every TOML type

EDGE_INTS = (0, -1, 1, 2, 3, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**400, -(10**400))
EDGE_FLOATS = (0.0, -0.0, 5e-324, -1e-300, 0.5, 1.0, 1.5, 1e308, -1e308, math.inf, -math.inf)
EDGE_FLOATS += (math.nan,)
EDGE_TEXT = ("", " ", "none", "0", "1e3", "ünïcødé", "名前", "a\nb", "\t", "\x00", "[/]", "a.b:c")
WORDS = (*EDGE_TEXT, *REGISTERED, *reg.OPTIMIZERS.names(), *ACCOUNTANTS.names())
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-3, 100),
    st.sampled_from(EDGE_INTS),
    st.floats(),
    st.sampled_from(EDGE_FLOATS),
    TEXT,
    st.sampled_from(WORDS),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
)
KEYS = st.sampled_from(ALL_KEYS) | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=8,
)


def rarely(odds: int) -> st.SearchStrategy[bool]:
    """True about once in ``odds`` draws (and not in the simplest example, which is False)."""
    return st.sampled_from([False] * (odds - 1) + [True])


def mostly(common: st.SearchStrategy[Any], other: st.SearchStrategy[Any], odds: int = 6) -> Any:
    """``common``, and ``other`` about once in ``odds`` draws."""
    return rarely(odds).flatmap(lambda r: other if r else common)


def typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the annotated type, edges included: they pass the type check, maybe not more."""
    origin = get_origin(tp)
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if origin in (Union, types.UnionType):
        return st.one_of([typed(a) for a in get_args(tp) if a is not type(None)])
    if origin is tuple:
        return st.lists(typed(get_args(tp)[0]), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(1, 8), st.integers(-1, 40), st.sampled_from(EDGE_INTS))
    if tp is float:
        return st.one_of(st.floats(0.0, 1.0), st.floats(-1.0, 10.0), st.sampled_from(EDGE_FLOATS))
    if tp is str:
        return st.sampled_from(WORDS) | TEXT
    return VALUES


def value_for(tp: Any) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type, sometimes anything."""
    return mostly(typed(tp), VALUES)


@st.composite
def section_table(draw: Any, section: str, name: Any = None, noise: bool = True) -> dict[str, Any]:
    """A table for ``[section]``: a registered component (usually) and some of its keys.

    With ``noise`` false, every value has its key's type and every name is registered.
    """
    values = value_for if noise else typed
    table: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if section in COMPONENTS:
        registry, name_key = COMPONENTS[section]
        if name is None:
            extra = ["fuzz.module:factory"] if section == "model" else []  # free-form params
            names = st.sampled_from(registry.names() + extra)
            name = draw(mostly(names, SCALARS) if noise else names)
        if not draw(rarely(10)):  # else the section's default component, with name's params
            table[name_key] = name
        fields = {k: v for k, v in OWN[section].items() if k != name_key}
        fields.update(params_hints(section, name))
        if section == "model" and isinstance(name, str) and ":" in name:
            table.update(draw(st.dictionaries(KEYS, VALUES, max_size=3)))
    elif section == "run":
        fields = dict(OWN["run"])
    else:
        fields = params_hints(section, None)
    if fields:
        for key in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=5)):
            table[key] = draw(values(fields[key]))
    if noise and draw(rarely(8)):  # a stray key
        table[draw(KEYS)] = draw(VALUES)
    return table


@st.composite
def random_scenarios(draw: Any) -> dict[str, Any]:
    """A random scenario table: real and made-up sections, real and made-up keys."""
    raw: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), unique=True, max_size=len(SECTIONS))):
        if section == "name":
            raw["name"] = draw(mostly(st.sampled_from(["fuzz", "a-b_c.1"]), SCALARS))
        else:
            raw[section] = draw(mostly(section_table(section), VALUES, 20))
    if draw(rarely(10)):  # a stray section
        raw[draw(KEYS)] = draw(VALUES)
    return raw


@st.composite
def typed_scenarios(draw: Any) -> dict[str, Any]:
    """Well-typed scenarios of registered components (with what they require elsewhere):
    they pass the type checks, so the range checks and cross-section checks decide."""
    raw: dict[str, Any] = {"name": "typed"}
    for section in draw(st.permutations(SECTIONS[1:]))[: draw(st.integers(2, len(SECTIONS)))]:
        raw[section] = draw(section_table(section, noise=False))
    for section, (registry, name_key) in COMPONENTS.items():
        name = raw.get(section, {}).get(name_key)
        if name in registry and draw(mostly(st.just(True), st.just(False))):
            for key, table in getattr(registry.get(name).obj, "requires", {}).items():
                raw.setdefault(key, {}).update(table)
    return raw


# ---------------------------------------------------------------- the shipped files, mutated


def _shipped() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Scenario tables (plain files and every sweep cell) and sweep tables, by label."""
    scenarios: dict[str, dict[str, Any]] = {}
    sweeps: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        raw = apply_overrides(tomllib.loads(path.read_text()), [])
        if not {"strategies", "settings", "base", "seeds"} & set(raw):
            scenarios[path.stem] = raw
            continue
        if "base" in raw:
            raw["base"] = str(path.parent / raw["base"])  # the fuzzed copy lives elsewhere
        sweeps[path.stem] = raw
        sweep: Sweep = load_sweep(path)
        for setting in sweep.settings:
            for strategy in sweep.strategies:
                cell = merge(merge(sweep.base, setting.overrides), strategy.overrides)
                cell["name"] = sweep.name
                scenarios[f"{path.stem}/{setting.label}/{strategy.label}"] = cell
    return scenarios, sweeps


SHIPPED, SHIPPED_SWEEPS = _shipped()


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (keys and list indices) to every value under ``node``."""
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_locations(value, (*prefix, key)))
    return out


def _parent(raw: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        raw = raw[part]
    return raw


def typos(word: str) -> st.SearchStrategy[str]:
    """Misspellings: a letter dropped, added or swapped, case, plural, dash for underscore."""
    n = len(word)

    def swap(i: int) -> str:
        return word[:i] + word[i + 1 : i + 2] + word[i : i + 1] + word[i + 2 :]

    return st.one_of(
        st.integers(0, max(n - 1, 0)).map(lambda i: word[:i] + word[i + 1 :]),
        st.integers(0, n).map(lambda i: word[:i] + "e" + word[i:]),
        st.integers(0, max(n - 2, 0)).map(swap),
        st.sampled_from([word.upper(), word + "s", word.replace("_", "-"), f" {word}", ""]),
    )


def _path(data: Any, raw: Any) -> tuple[Any, ...] | None:
    paths = _locations(raw)
    return data.draw(st.sampled_from(paths)) if paths else None


def drop(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    if (path := _path(data, raw)) is not None:
        del _parent(raw, path)[path[-1]]


def retype(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    if (path := _path(data, raw)) is not None:
        _parent(raw, path)[path[-1]] = data.draw(VALUES)


def out_of_range(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    if (path := _path(data, raw)) is not None:
        edges = st.sampled_from(EDGE_INTS + EDGE_FLOATS + ("", True, False))
        _parent(raw, path)[path[-1]] = data.draw(edges)


def misspell(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    paths = [p for p in _locations(raw) if isinstance(p[-1], str)]
    if paths:
        path = data.draw(st.sampled_from(paths))
        node = _parent(raw, path)
        node[data.draw(typos(path[-1]))] = node.pop(path[-1])


def switch(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    """Swap a section's component for any registered one, with drawn parameters."""
    target = data.draw(st.sampled_from(targets))
    section = data.draw(st.sampled_from(sorted(COMPONENTS)))
    registry, _ = COMPONENTS[section]
    name = data.draw(st.sampled_from(registry.names()))
    old = target.get(section)
    kept = {k: v for k, v in old.items() if k in OWN[section]} if isinstance(old, dict) else {}
    target[section] = {**kept, **data.draw(section_table(section, name))}
    if data.draw(st.booleans()):  # what the component needs elsewhere (e.g. its own client)
        for key, table in getattr(registry.get(name).obj, "requires", {}).items():
            if isinstance(target.get(key), dict):
                target[key].update(table)
            else:
                target[key] = dict(table)


def add_key(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    """Put a real key, perhaps of another component, in some section."""
    target = data.draw(st.sampled_from(targets))
    section = data.draw(st.sampled_from(SECTIONS[1:]))
    if not isinstance(target.get(section), dict):
        target[section] = {}
    target[section][data.draw(st.sampled_from(ALL_KEYS))] = data.draw(VALUES)


def add_section(data: Any, raw: Any, targets: list[dict[str, Any]]) -> None:
    target = data.draw(st.sampled_from(targets))
    section = data.draw(st.sampled_from(SECTIONS[1:]))
    target[section] = data.draw(section_table(section))


Mutation = Callable[[Any, Any, list[dict[str, Any]]], None]
MUTATIONS: list[Mutation] = [drop, retype, misspell, add_key, add_section]
MUTATIONS += [out_of_range] * 2 + [switch] * 3


def mutate(data: Any, raw: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        data.draw(st.sampled_from(MUTATIONS))(data, raw, targets)


def sweep_targets(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario-shaped tables of a sweep: ``[scenario]`` and every variant."""
    if not isinstance(raw.get("scenario"), dict):
        raw["scenario"] = {}
    out = [raw["scenario"]]
    for key in ("strategies", "settings"):
        if isinstance(raw.get(key), list):
            out.extend(v for v in raw[key] if isinstance(v, dict))
    return out


OVERRIDES = st.one_of(
    st.builds(
        "{}.{}={}".format,
        st.sampled_from(SECTIONS[1:]) | TEXT,
        st.sampled_from(ALL_KEYS) | TEXT,
        st.sampled_from(
            ["2", "0", "-1", "nan", "-inf", "1e999", "9" * 5000, "[" * 3000, "[1, 'a']", "{a = 1}"]
            + ["true", "1979-05-27", "", "fedprox", '"sgd"', "= 1", "{", "'''"]
        )
        | TEXT,
    ),
    TEXT,
)

# ---------------------------------------------------------------- the property


def named(err: ConfigError, roots: set[str]) -> ConfigError:
    """Assert ``err`` names a key of the input (or a section, or the file) in one line."""
    assert isinstance(err.key, str) and str(err).split(" = ")[0].strip(), str(err)
    heads = roots | set(SECTIONS) | {"scenario", "--set"}
    key = err.key
    assert any(key == h or key.startswith((f"{h}.", f"{h}[")) for h in heads), (key, roots)
    assert len(str(err).splitlines()) == 1, str(err)
    return err


def has_nan(value: Any) -> bool:
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def sound(scenario: Scenario) -> Scenario:
    """A valid scenario hashes, and its run directory's scenario.toml gives it back."""
    again = parse_scenario(tomllib.loads(tomli_w.dumps(scenario.to_dict())))
    assert again.fingerprint() == scenario.fingerprint()
    assert again == scenario or has_nan(scenario.to_dict())
    return scenario


def outcome(fn: Callable[[], Any], roots: set[str]) -> Any:
    """``fn()``'s Scenario or Sweep, or its ConfigError; anything else escapes and fails."""
    try:
        result = fn()
    except ConfigError as err:
        return named(err, roots)
    if isinstance(result, Scenario):
        return sound(result)
    assert isinstance(result, Sweep)
    return result


def same(a: Any, b: Any) -> None:
    """The same verdict from a mapping and from its TOML file (which may list keys in another
    order, so another of several bad keys may be the first one found)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, Scenario):
        assert a.fingerprint() == b.fingerprint()


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every example's file (each example overwrites the last one's)."""
    return tmp_path_factory.mktemp("fuzz")


def roots_of(raw: Any, sets: Sequence[str] = ()) -> set[str]:
    """Every key of ``raw`` at any depth, and the first part of every override's key."""
    keys = {p[-1] for p in _locations(raw) if isinstance(p[-1], str)}
    return keys | {item.split("=")[0].strip().split(".")[0] for item in sets}


# ---------------------------------------------------------------- tests


@FUZZ
@given(raw=random_scenarios())
def test_random_tables_validate_or_name_a_key(raw, scratch):
    direct = outcome(lambda: parse_scenario(raw), roots_of(raw))
    path = write(scratch / "random.toml", raw)
    if not raw:  # an empty file is refused by name, where an empty table validates
        with pytest.raises(ConfigError, match="it is empty"):
            load_scenario(path)
        return
    same(direct, outcome(lambda: load_scenario(path), roots_of(raw)))


@FUZZ
@given(raw=typed_scenarios())
def test_well_typed_scenarios_validate_or_name_a_key(raw):
    outcome(lambda: parse_scenario(raw), roots_of(raw))


@FUZZ
@given(data=st.data(), which=st.sampled_from(sorted(SHIPPED)))
def test_mutated_shipped_scenarios_validate_or_name_a_key(data, which, scratch):
    raw = copy.deepcopy(SHIPPED[which])
    mutate(data, raw, [raw])
    direct = outcome(lambda: parse_scenario(raw), roots_of(raw))
    path = write(scratch / "mutated.toml", raw)
    same(direct, outcome(lambda: load_scenario(path), roots_of(raw)))
    sets = data.draw(st.lists(OVERRIDES, max_size=2))
    outcome(lambda: load_scenario(path, sets), roots_of(raw, sets))


@settings(FUZZ, max_examples=60)
@given(data=st.data(), which=st.sampled_from(sorted(SHIPPED_SWEEPS)))
def test_mutated_shipped_sweeps_validate_or_name_a_key(data, which, scratch):
    raw = copy.deepcopy(SHIPPED_SWEEPS[which])
    raw["seeds"] = [0]  # one seed: the cells differ only in run.seed
    mutate(data, raw, sweep_targets(raw))
    if data.draw(rarely(4)):
        raw[data.draw(st.sampled_from(SWEEP_KEYS) | KEYS)] = data.draw(VALUES)
    path = write(scratch / "sweep.toml", raw)
    sets = data.draw(st.lists(OVERRIDES, max_size=1))
    outcome(lambda: load_sweep(path, sets), roots_of(raw, sets) | {"base"})


def variants(section: str) -> st.SearchStrategy[Any]:
    table = st.fixed_dictionaries({"label": TEXT}, optional={section: section_table(section)})
    return st.lists(table, max_size=2) | VALUES


@settings(FUZZ, max_examples=80)
@given(
    raw=st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["s", ""]) | SCALARS,
            "base": st.just(str(ROOT / "scenarios" / "quickstart.toml")) | VALUES,
            "seeds": st.lists(st.integers(-1, 3) | SCALARS, max_size=3) | VALUES,
            "target_accuracy": st.floats() | VALUES,
            "columns": st.lists(TEXT, max_size=2) | VALUES,
            "scenario": section_table("run").map(lambda t: {"run": t}) | VALUES,
            "strategies": variants("strategy"),
            "settings": variants("partition"),
        },
    )
)
def test_random_sweeps_validate_or_name_a_key(raw, scratch):
    path = write(scratch / "random_sweep.toml", raw)
    outcome(lambda: load_sweep(path), roots_of(raw))


@settings(FUZZ, max_examples=40)
@given(data=st.data(), which=st.sampled_from(sorted(SHIPPED)), at=st.integers(0, 10**6))
def test_corrupted_files_validate_or_name_a_key(data, which, at, scratch):
    blob = bytearray(tomli_w.dumps(SHIPPED[which]).encode())
    at %= len(blob)
    junk = data.draw(st.binary(max_size=3) | st.sampled_from([b"[", b"\xff", b"="]))
    blob[at : at + data.draw(st.integers(0, 3))] = junk
    path = scratch / "corrupt.toml"
    path.write_bytes(bytes(blob))
    try:
        roots = roots_of(read_toml(path))
    except ConfigError:
        roots = set()
    outcome(lambda: load_scenario(path), roots)


@settings(FUZZ, max_examples=12)
@given(data=st.data(), which=st.sampled_from(sorted(SHIPPED)))
def test_cli_exits_2_with_one_line_on_a_bad_file(data, which, scratch, capsys):
    raw = copy.deepcopy(SHIPPED[which])
    mutate(data, raw, [raw])
    path = write(scratch / "bad.toml", raw)
    try:
        load_scenario(path)  # the file's own values (TOML drops e.g. a time's fold)
    except ConfigError as err:
        expected = f"error: {err}\n"
    else:
        assume(False)  # a valid file would start a run
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == expected


# ---------------------------------------------------------------- what the fuzzing found


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        (b'name = "\xff"\n', "scenario", "valid TOML ('utf-8' codec"),
        (b"[run]\nrounds = " + b"9" * 5000 + b"\n", "scenario", "4300 digits"),
        (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "scenario", "recursion"),
        (b"name = 1979-05-27\n", "name", "datetime.date(1979, 5, 27)"),
        (b'name = ".."\n', "name", "not only dots"),
        (b"[client]\nlr = 1" + b"0" * 400 + b"\n", "client.lr", "a number"),
        (b"curriculum = 5\n", "curriculum", "a table of keys"),
        (b'pretrain = "ab"\n', "pretrain", "a table of keys"),
        (b"user_dp = false\n", "user_dp", "a table of keys"),
        (b'"a\\nb" = 1\n', "a\nb", "'a\\nb' = 1 is not allowed: a scenario section"),
        (b'"" = 1\n', "", "'' = 1 is not allowed: a scenario section"),
        (None, "scenario", "a readable file (Is a directory)"),
    ],
)
def test_hostile_scenario_files_name_the_key(tmp_path, text, key, fragment):
    path = tmp_path
    if text is not None:
        path = tmp_path / "s.toml"
        path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert info.value.key == key and fragment in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("raw", "sets", "key", "fragment"),
    [
        ({"run": {"rounds": -(10**4301)}}, [], "run.rounds", "<int too large to print>"),
        ({"model": {"activation": -(10**4301)}}, [], "model.activation", "one of 'relu', 'tanh'"),
        ({"client": {"lr": 10**4301}}, [], "client.lr", "a number"),
        ({}, ["run.rounds=" + "9" * 5000], "run.rounds", "an integer"),
        ({}, ["run.rounds=" + "[" * 3000], "run.rounds", "an integer"),
        ({}, ["run.rounds=1979-05-27"], "run.rounds", "an integer"),
    ],
)
def test_values_python_cannot_print_or_parse_are_named(raw, sets, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_scenario(apply_overrides(raw, sets))
    assert info.value.key == key and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("scenario = 5\n", "scenario", "a table of scenario keys"),
        ('base = ""\n', "base", "a readable file"),
        ('base = "\\u0000"\n', "base", "embedded null byte"),
        ('base = "missing.toml"\n', "base", "an existing TOML file"),
        ("[scenario]\nrun.rounds = 1979-05-27\n", "run.rounds", "an integer"),
    ],
)
def test_hostile_sweep_files_name_the_key(tmp_path, text, key, fragment):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.key == key and fragment in str(info.value), str(info.value)


def test_free_form_model_params_with_a_date_still_hash():
    raw = {"model": {"name": "fuzz.module:factory", "when": datetime.date(1979, 5, 27)}}
    scenario = parse_scenario(raw)
    assert scenario.model.params["when"] == datetime.date(1979, 5, 27)
    assert sound(scenario).fingerprint() == parse_scenario(scenario.to_dict()).fingerprint()


def test_cli_compare_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text("target_accuracy = nan\n")
    assert main(["compare", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "error: target_accuracy = nan is not allowed: a number in (0, 1]\n"


@pytest.mark.parametrize(
    ("command", "raw"),
    [
        ("run", {"data": {"name": "[/]"}}),
        ("run", {"data": {"name": "[bold]x"}}),
        ("run", {"data": {"alpha": 1}}),  # the message names the section: "a key of [data] ..."
        ("compare", {"scenario": 5}),
    ],
)
def test_cli_prints_brackets_in_a_message_verbatim(tmp_path, capsys, command, raw):
    path = write(tmp_path / "bad.toml", raw)
    load = load_sweep if command == "compare" else load_scenario
    with pytest.raises(ConfigError) as info:
        load(path)
    capsys.readouterr()
    assert main([command, str(path)]) == 2
    assert capsys.readouterr().err == f"error: {info.value}\n"
