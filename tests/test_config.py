"""Scenario validation: every error path names the key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fedopt.cli import main
from fedopt.config import apply_overrides, load_scenario, parse_scenario
from fedopt.errors import ConfigError
from fedopt.params import check
from fedopt.registry import SECTIONS
from fedopt.task import build_task

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "scenarios" / "quickstart.toml"


def base(**sections):
    raw = {"name": "t", "data": {"name": "blobs", "num_examples": 200}, "run": {"rounds": 2}}
    raw.update(sections)
    return raw


def expect(raw, key, *fragments):
    with pytest.raises(ConfigError) as info:
        parse_scenario(raw)
    err = info.value
    assert err.key == key, str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    return err


def test_quickstart_parses_and_round_trips():
    s = load_scenario(QUICK)
    assert s.name == "quickstart"
    assert s.client.params.lr == 0.2
    assert s.model.params.hidden == (128,)
    assert s.clients_per_round == 10
    again = parse_scenario(s.to_dict())
    assert again == s
    assert again.fingerprint() == s.fingerprint()


def test_defaults_fill_every_section():
    s = parse_scenario({})
    assert (s.data.name, s.partition.name, s.model.name) == ("digits", "iid", "mlp")
    assert (s.client.name, s.strategy.name, s.run.rounds) == ("sgd", "fedavg", 10)


def test_unknown_section_has_did_you_mean():
    expect(base(strategyy={"name": "fedavg"}), "strategyy", "did you mean 'strategy'")


def test_unknown_key_names_section_and_suggests():
    expect(base(run={"round": 3}), "run.round", "did you mean 'rounds'")
    err = expect(base(strategy={"name": "fedprox", "mu": 0.1}), "strategy.mu", "proximal_mu")
    assert "fedprox" in str(err)


def test_unknown_component_name_lists_known_ones():
    expect(base(strategy={"name": "fedavgg"}), "strategy.name", "fedavg", "did you mean 'fedavg'")
    expect(base(client={"name": "sdg"}), "client.name", "did you mean 'sgd'")
    expect(base(heterogeneity={"speed": "fast"}), "heterogeneity.speed", "lognormal")
    expect(base(data={"name": "mnistt"}), "data.name", "mnist")


@pytest.mark.parametrize(
    ("section", "value", "key", "fragment"),
    [
        ("run", {"rounds": 0}, "run.rounds", ">= 1"),
        ("run", {"rounds": "5"}, "run.rounds", "an integer"),
        ("run", {"rounds": 2.5}, "run.rounds", "an integer"),
        ("run", {"rounds": True}, "run.rounds", "an integer"),
        ("run", {"seed": -1}, "run.seed", ">= 0"),
        ("run", {"num_gpus": -0.5}, "run.num_gpus", ">= 0"),
        ("run", {"workers": 0}, "run.workers", ">= 1"),
        ("partition", {"num_clients": 0}, "partition.num_clients", ">= 1"),
        ("partition", {"test_fraction": 1.0}, "partition.test_fraction", "0 <= x < 1"),
        ("partition", {"name": "dirichlet", "alpha": 0.0}, "partition.alpha", "> 0"),
        ("partition", {"name": "dirichlet", "alpha": -1.0}, "partition.alpha", "> 0"),
        ("heterogeneity", {"availability": 0.0}, "heterogeneity.availability", "0 < p <= 1"),
        ("heterogeneity", {"speed": "fx", "spread": 100.0}, "heterogeneity.spread", ""),
        ("client", {"lr": -0.1}, "client.lr", ""),
        ("client", {"optimizer": "adamw"}, "client.optimizer", "adam"),
        ("client", {"batch_size": 0}, "client.batch_size", ""),
        ("strategy", {"name": "fedprox", "proximal_mu": -1.0}, "strategy.proximal_mu", ">= 0"),
        ("strategy", {"name": "fedadam", "beta_1": 1.0}, "strategy.beta_1", "0 <= beta_1 < 1"),
        ("strategy", {"name": "fedtrimmedavg", "beta": 0.5}, "strategy.beta", "< 0.5"),
        ("model", {"name": "mlp", "hidden": "128"}, "model.hidden", "a list of an integer"),
        ("model", {"name": "mlp", "activation": "gelu"}, "model.activation", "'relu'"),
        ("data", {"test_fraction": 0.0}, "data.test_fraction", "0 < x < 1"),
    ],
)
def test_bad_values_are_named(section, value, key, fragment):
    err = expect(base(**{section: value}), key, fragment)
    assert repr(err.value) in str(err) or str(err.value) in str(err)


def test_section_must_be_a_table():
    expect(base(run=5), "run", "a table")


def test_cross_section_conflicts():
    expect(
        base(partition={"num_clients": 4}, run={"clients_per_round": 5}),
        "run.clients_per_round",
        "4",
    )
    expect(base(run={"clients_per_round": 3, "min_replies": 4}), "run.min_replies", "3")
    expect(base(partition={"num_clients": 4}, run={"fed_eval_clients": 9}), "run.fed_eval_clients")


def test_bad_name():
    expect({"name": "a b"}, "name", "letters")
    expect({"name": ""}, "name", "non-empty")


def test_overrides_parse_toml_values():
    raw = apply_overrides(
        {"run": {"rounds": 5}},
        ["run.rounds=2", "strategy.name=fedprox", "model.hidden=[64, 32]", "run.num_gpus=0.5"],
    )
    assert raw == {
        "run": {"rounds": 2, "num_gpus": 0.5},
        "strategy": {"name": "fedprox"},
        "model": {"hidden": [64, 32]},
    }
    s = load_scenario(QUICK, ["run.rounds=3", "strategy.name=fedprox", "strategy.proximal_mu=0.5"])
    assert s.run.rounds == 3 and s.strategy.params.proximal_mu == 0.5


def test_bad_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["run.rounds"])
    with pytest.raises(ConfigError, match="dotted key"):
        apply_overrides({}, ["run..rounds=3"])
    with pytest.raises(ConfigError, match="run.roundz"):
        load_scenario(QUICK, ["run.roundz=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="an existing TOML file"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_scenario(bad)


def test_replace_revalidates():
    s = load_scenario(QUICK)
    t = s.replace(**{"run.seed": 4, "strategy.name": "fedavgm"})
    assert t.run.seed == 4 and t.strategy.params.server_momentum == 0.9
    with pytest.raises(ConfigError):
        s.replace(**{"run.rounds": 0})


def test_custom_model_params_pass_through():
    s = parse_scenario(base(model={"name": "my.models:net", "width": 7}))
    assert dict(s.model.params) == {"width": 7}
    assert s.to_dict()["model"] == {"name": "my.models:net", "width": 7}
    assert parse_scenario(s.to_dict()) == s
    assert len(s.fingerprint()) == 12


def test_registered_section_is_validated():
    @dataclass(frozen=True)
    class Extra:
        level: int = 1

        def __post_init__(self):
            check(self.level >= 0, "level", self.level, ">= 0")

    SECTIONS.register("test_extra_section", Extra, replace=True)
    try:
        s = parse_scenario(base(test_extra_section={"level": 3}))
        assert s.extras["test_extra_section"] == Extra(level=3)
        assert parse_scenario(s.to_dict()) == s
        expect(base(test_extra_section={"level": -1}), "test_extra_section.level", ">= 0")
        expect(
            base(test_extra_section={"levl": 1}), "test_extra_section.levl", "did you mean 'level'"
        )
    finally:
        SECTIONS.unregister("test_extra_section")
    expect(base(test_extra_section={"level": 3}), "test_extra_section", "a scenario section")


def test_data_errors_surface_before_any_engine():
    with pytest.raises(ConfigError) as info:
        build_task(parse_scenario(base(partition={"num_clients": 500})))
    assert info.value.key == "partition.num_clients"
    with pytest.raises(ConfigError) as info:
        build_task(parse_scenario(base(model={"name": "cnn"})))
    assert info.value.key == "model.name" and "image-shaped" in str(info.value)


def test_model_that_does_not_fit_is_rejected_at_start(tmp_path, monkeypatch):
    (tmp_path / "wrongnet.py").write_text(
        "import torch\n"
        "def factory(input_shape, num_classes, **kw):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes + 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        build_task(parse_scenario(base(model={"name": "wrongnet:factory"})))
    assert info.value.key == "model.name" and "(batch, 4)" in str(info.value)


def test_cli_exits_2_without_traceback(capsys):
    code = main(["run", str(QUICK), "--set", "strategy.name=fedavgg"])
    captured = capsys.readouterr()
    assert code == 2
    assert "strategy.name" in captured.err and "did you mean 'fedavg'" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert main(["run", str(QUICK), "--set", "partition.num_clients=100000"]) == 2
    assert "partition.num_clients" in capsys.readouterr().err
