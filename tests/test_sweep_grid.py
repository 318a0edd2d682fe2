"""``[grid]`` expands to the product of its values; ``--set`` reaches sweep-level keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedopt.compare import load_sweep
from fedopt.errors import ConfigError
from fedopt.sweep_grid import apply_sweep_sets, expand_grid

ROOT = Path(__file__).resolve().parents[1]

SWEEP = f"""
name = "g"
base = "{ROOT / "scenarios" / "quickstart.toml"}"
seeds = [0, 1, 2]

[scenario]
run.rounds = 2
partition.name = "dirichlet"

[grid]
"partition.alpha" = [0.05, 0.5, 100]
"client.lr" = [0.01, 0.1]

[[strategies]]
label = "fedavg"
"""


def test_the_grid_is_the_product_labelled_by_values(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(SWEEP)
    sweep = load_sweep(path)
    assert [s.label for s in sweep.settings] == [
        "alpha=0.05, lr=0.01",
        "alpha=0.05, lr=0.1",
        "alpha=0.5, lr=0.01",
        "alpha=0.5, lr=0.1",
        "alpha=100, lr=0.01",
        "alpha=100, lr=0.1",
    ]
    cells = sweep.cells()
    assert len(cells) == 6 * 3
    _, setting, seed, sc = cells[3 * 3 + 1]  # alpha=0.5, lr=0.1, seed 1
    assert setting.label == "alpha=0.5, lr=0.1" and seed == 1
    assert sc.partition.params.alpha == 0.5 and sc.client.params.lr == 0.1


def test_grid_crosses_written_settings_and_keeps_full_keys_when_short_ones_clash():
    got = expand_grid(
        {"client.lr": [0.1], "strategy.lr": [1, 2]},
        [{"label": "iid", "partition": {"name": "iid"}}],
    )
    assert got == [
        {
            "label": "iid, client.lr=0.1, strategy.lr=1",
            "partition": {"name": "iid"},
            "client": {"lr": 0.1},
            "strategy": {"lr": 1},
        },
        {
            "label": "iid, client.lr=0.1, strategy.lr=2",
            "partition": {"name": "iid"},
            "client": {"lr": 0.1},
            "strategy": {"lr": 2},
        },
    ]


@pytest.mark.parametrize(
    ("grid", "key"),
    [
        ({"lr": [0.1]}, "grid.lr"),
        ({"client.lr": []}, "grid.client.lr"),
        ({"client.lr": [0.1, 0.1]}, "grid.client.lr"),
        ({"client.lr": [{"a": 1}]}, "grid.client.lr"),
        ({"client.lr": 0.1}, "grid.client.lr"),
        ([], "grid"),
    ],
)
def test_a_bad_grid_is_named(grid, key):
    with pytest.raises(ConfigError) as info:
        expand_grid(grid, None)
    assert info.value.key == key


def test_sweep_level_sets_change_the_sweep_and_the_rest_the_scenario(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(SWEEP)
    sweep = load_sweep(
        path, ["seeds=[4, 5]", 'grid."partition.alpha"=[1.0]', "run.rounds=3", "name=h"]
    )
    assert sweep.seeds == (4, 5) and sweep.name == "h"
    assert [s.label for s in sweep.settings] == ["alpha=1.0, lr=0.01", "alpha=1.0, lr=0.1"]
    assert {sc.run.rounds for *_, sc in sweep.cells()} == {3}
    raw, rest = apply_sweep_sets({"seeds": [0]}, ["seeds=[1]", "client.lr=0.2"])
    assert raw == {"seeds": [1]} and rest == ["client.lr=0.2"]
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep(path, ["seeds=[1, 1]"])


def test_the_swept_axis_is_the_one_numeric_key_the_settings_vary(tmp_path):
    from fedopt.compare import swept_axis

    path = tmp_path / "g.toml"
    path.write_text(SWEEP)
    assert swept_axis(load_sweep(path)) is None  # alpha and lr both vary
    one = load_sweep(path, ['grid."client.lr"=[0.1]'])
    assert swept_axis(one) == (
        "partition.alpha",
        {"alpha=0.05, lr=0.1": 0.05, "alpha=0.5, lr=0.1": 0.5, "alpha=100, lr=0.1": 100.0},
    )


def test_plot_across_writes_one_figure_per_metric(tmp_path):
    from fedopt.plots import plot_across

    values = {
        "fedavg": {0.05: [0.5, 0.6], 100.0: [0.9, 0.92]},
        "fedprox": {0.05: [0.55], 100.0: [0.9]},
    }
    path = plot_across(values, tmp_path, title="t", key="partition.alpha", metric="final_accuracy")
    assert path.name == "compare_final_accuracy_vs_partition.alpha.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
