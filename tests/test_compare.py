"""Sweep files: validation up front, cells, merging."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedopt.compare import load_sweep, merge
from fedopt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def sweep(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(f'base = "{ROOT / "scenarios" / "quickstart.toml"}"\n' + text)
    return path


def test_shipped_heterogeneity_sweep_has_27_valid_cells():
    s = load_sweep(ROOT / "scenarios" / "heterogeneity.toml")
    cells = s.cells()
    assert len(cells) == 27 and s.target == 0.9
    labels = {(a.label, b.label, seed) for a, b, seed, _ in cells}
    assert ("fedprox", "alpha=0.05", 2) in labels
    sc = next(c[3] for c in cells if c[0].label == "fedadam" and c[1].label == "alpha=100")
    assert sc.partition.params.alpha == 100.0 and sc.strategy.params.eta == 0.1
    assert sc.run.rounds == 20 and sc.name == "heterogeneity"


def test_merge_is_deep_and_does_not_mutate():
    base = {"run": {"rounds": 5, "seed": 0}, "name": "x"}
    out = merge(base, {"run": {"rounds": 2}})
    assert out == {"run": {"rounds": 2, "seed": 0}, "name": "x"}
    assert base["run"]["rounds"] == 5


def test_a_bad_cell_is_caught_before_anything_runs(tmp_path):
    path = sweep(
        tmp_path,
        '[[strategies]]\nlabel = "a"\nstrategy.name = "fedavg"\n'
        '[[strategies]]\nlabel = "b"\nstrategy.name = "fedprox"\nstrategy.mu = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.key == "strategy.mu"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seed = [0]\n", "seed"),
        ("seeds = []\n", "seeds"),
        ("seeds = [1, 1]\n", "seeds"),
        ("seeds = [-1]\n", "seeds"),
        ("target_accuracy = 1.5\n", "target_accuracy"),
        ('[[strategies]]\nstrategy.name = "fedavg"\n', "strategies[0].label"),
        ('[[settings]]\nlabel = "x"\n[[settings]]\nlabel = "x"\n', "settings[1].label"),
    ],
)
def test_sweep_errors_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep(tmp_path, text))
    assert info.value.key == key


def test_overrides_apply_to_every_cell(tmp_path):
    s = load_sweep(sweep(tmp_path, "seeds = [0, 1]\n"), ["run.rounds=2"])
    assert [c[3].run.rounds for c in s.cells()] == [2, 2]
    assert [c[3].run.seed for c in s.cells()] == [0, 1]


def test_extra_columns_and_registered_figures(tmp_path):
    from fedopt.plots import Figure, plot_run
    from fedopt.registry import PLOTS
    from fedopt.tables import CellResult, compare_rows, format_markdown

    def rows(e):
        return (
            {"round": 0, "central_accuracy": 0.1},
            {"round": 1, "central_accuracy": 0.8, "eps": e},
        )

    cells = [CellResult("s", "x", seed, rows(e), {}) for seed, e in ((0, 1.0), (1, 3.0))]
    table = compare_rows(cells, target=None, columns=["eps"])
    assert table[0]["eps_mean"] == 2.0 and table[0]["eps_std"] == 1.0
    assert "| eps |" in format_markdown(table, target=None, columns=["eps"])
    assert "2.000 ± 1.000" in format_markdown(table, target=None, columns=["eps"])
    PLOTS.register(
        "test_fig", Figure("acc_vs_eps.png", "eps", "eps", "Accuracy", ("accuracy",)), replace=True
    )
    try:
        written = plot_run(list(rows(1.0)), tmp_path, title="t")
    finally:
        PLOTS.unregister("test_fig")
    assert tmp_path / "acc_vs_eps.png" in written
    with pytest.raises(ConfigError):
        load_sweep(sweep(tmp_path, "columns = 3\n"))
