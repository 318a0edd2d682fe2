"""The README stays true: the two commands, the embedded reference, the examples it shows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fedopt.config import parse_scenario
from fedopt.docs import scenario_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert README.index("make demo") < 200


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_embedded_reference_is_current():
    embedded = README.split("<!-- reference:start -->\n", 1)[1].split("<!-- reference:end -->")[0]
    assert embedded == scenario_reference()


def test_toml_examples_in_the_readme_are_valid():
    blocks = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    scenario = tomllib.loads(blocks[0])
    s = parse_scenario(scenario)
    assert s.strategy.params.proximal_mu == 0.05 and s.heterogeneity.params.slow_fraction == 0.3
    sweep = tomllib.loads(blocks[1])
    assert sweep["strategies"][0]["strategy"] == {"name": "fedprox", "proximal_mu": 0.1}


def test_every_shipped_scenario_parses():
    for path in (ROOT / "scenarios").glob("*.toml"):
        raw = tomllib.loads(path.read_text())
        if "base" in raw or "strategies" in raw:
            from fedopt.compare import load_sweep

            assert load_sweep(path).cells()
        else:
            parse_scenario(raw)


def test_every_package_directory_is_packaged():
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packaged = set(find_packages(where=str(ROOT), include=include))
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("fedopt", "strategies", "clients", "scenarios")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk <= packaged, on_disk - packaged
