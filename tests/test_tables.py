"""Tests of fedopt.tables (the comparison table) and fedopt.plots.plot_compare."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from fedopt.errors import ConfigError
from fedopt.plots import mean_curve
from fedopt.report import summarize
from fedopt.tables import (
    COMPARE_COLUMNS,
    CellResult,
    compare_rows,
    format_markdown,
    rounds_to_target,
    time_to_target,
    write_compare,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_rows(accs, *, dt, up=500) -> tuple[dict, ...]:
    """Rows of a run: round r has central accuracy accs[r], sim_time r*dt, 1000 B down."""
    rows = []
    for r, acc in enumerate(accs):
        row = {"round": r, "sim_time": r * dt, "central_accuracy": acc, "central_loss": 1 - acc}
        if r:
            row.update(bytes_down=1000, bytes_up=up, cum_bytes=r * (1000 + up))
        rows.append(row)
    return tuple(rows)


def cell(strategy, setting, seed, rows, *, with_summary=True) -> CellResult:
    return CellResult(strategy, setting, seed, rows, summarize(rows) if with_summary else {})


def make_cells() -> list[CellResult]:
    return [
        cell("fedavg", "iid", 0, run_rows([0.1, 0.85, 0.91, 0.93], dt=10.0)),
        cell("fedprox", "noniid α=0.1", 0, run_rows([0.1, 0.5, 0.8, 0.9], dt=5.0)),
        cell("fedavg", "iid", 1, run_rows([0.1, 0.92, 0.9, 0.95], dt=12.0)),
        cell(
            "fedavg", "iid", 2, run_rows([0.1, 0.6, 0.8, 0.7], dt=10.0, up=600), with_summary=False
        ),
    ]


def pstd(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_rounds_and_time_to_target():
    rows = run_rows([0.1, 0.85, 0.91, 0.93], dt=10.0)
    assert rounds_to_target(rows, target=0.9) == 2
    assert time_to_target(rows, target=0.9) == 20.0
    assert rounds_to_target(rows, target=0.1) == 0
    assert rounds_to_target(rows, target=0.95) is None
    assert time_to_target(rows, target=0.95) is None
    fed_only = [{"round": 1, "sim_time": 4.5, "fed_accuracy": 0.5}]
    assert (rounds_to_target(fed_only, target=0.5), time_to_target(fed_only, target=0.5)) == (
        1,
        4.5,
    )


def test_compare_rows_exact():
    table = compare_rows(make_cells(), target=0.9)
    assert [(r["setting"], r["strategy"]) for r in table] == [
        ("iid", "fedavg"),
        ("noniid α=0.1", "fedprox"),
    ]
    assert all(list(r) == list(COMPARE_COLUMNS) for r in table)
    iid, noniid = table
    finals, bests = [0.93, 0.95, 0.7], [0.93, 0.95, 0.8]
    assert iid["seeds"] == 3
    assert iid["final_acc_mean"] == pytest.approx(sum(finals) / 3, abs=1e-15)
    assert iid["final_acc_std"] == pytest.approx(pstd(finals), abs=1e-15)
    assert iid["best_acc_mean"] == pytest.approx(sum(bests) / 3, abs=1e-15)
    assert iid["best_acc_std"] == pytest.approx(pstd(bests), abs=1e-15)
    assert iid["rounds_to_target_mean"] == 1.5
    assert iid["reached"] == 2
    assert iid["sim_time_to_target_mean"] == 16.0
    assert iid["bytes_total_mean"] == 4600.0
    assert isinstance(iid["bytes_total_mean"], float)
    assert iid["sim_time_mean"] == 32.0
    assert noniid == {
        "setting": "noniid α=0.1",
        "strategy": "fedprox",
        "seeds": 1,
        "final_acc_mean": 0.9,
        "final_acc_std": 0.0,
        "best_acc_mean": 0.9,
        "best_acc_std": 0.0,
        "rounds_to_target_mean": 3.0,
        "reached": 1,
        "sim_time_to_target_mean": 15.0,
        "bytes_total_mean": 4500.0,
        "sim_time_mean": 15.0,
    }


def test_compare_rows_without_target_and_bad_target():
    iid = compare_rows(make_cells(), target=None)[0]
    assert iid["rounds_to_target_mean"] is None
    assert iid["reached"] is None
    assert iid["sim_time_to_target_mean"] is None
    assert compare_rows(make_cells(), target=0.99)[0]["reached"] == 0
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError) as err:
            compare_rows(make_cells(), target=bad)
        assert err.value.key == "target"


def table_rows() -> list[dict]:
    return [
        {
            "setting": "iid",
            "strategy": "fedavg",
            "seeds": 3,
            "final_acc_mean": 0.912,
            "final_acc_std": 0.004,
            "best_acc_mean": 0.92,
            "best_acc_std": 0.0,
            "rounds_to_target_mean": 12.0,
            "reached": 2,
            "sim_time_to_target_mean": 340.26,
            "bytes_total_mean": 12_345_678.0,
            "sim_time_mean": 500.0,
        },
        {
            "setting": "a|b",
            "strategy": "fedprox",
            "seeds": 2,
            "final_acc_mean": 0.5,
            "final_acc_std": 0.1,
            "best_acc_mean": 0.6,
            "best_acc_std": 0.05,
            "rounds_to_target_mean": None,
            "reached": 0,
            "sim_time_to_target_mean": None,
            "bytes_total_mean": None,
            "sim_time_mean": None,
        },
        {
            "setting": "iid",
            "strategy": "scaffold",
            "seeds": 2,
            "final_acc_mean": 0.95,
            "final_acc_std": 0.0125,
            "best_acc_mean": 0.96,
            "best_acc_std": 0.01,
            "rounds_to_target_mean": 7.5,
            "reached": 2,
            "sim_time_to_target_mean": 80.0,
            "bytes_total_mean": 2_500_000.0,
            "sim_time_mean": 120.0,
        },
    ]


def test_format_markdown_exact():
    assert format_markdown(table_rows(), target=0.9) == (
        "| setting | strategy | final acc | best acc | rounds to 90% | sim time to 90% | MB |\n"
        "|---|---|---|---|---|---|---|\n"
        "| iid | fedavg | 0.912 ± 0.004 | 0.920 ± 0.000 | 12.0 (2/3) | 340.3 (2/3) | 12.35 |\n"
        "| a\\|b | fedprox | 0.500 ± 0.100 | 0.600 ± 0.050 | — | — | — |\n"
        "| iid | scaffold | 0.950 ± 0.013 | 0.960 ± 0.010 | 7.5 | 80.0 | 2.50 |\n"
    )
    assert format_markdown(table_rows()[2:], target=None) == (
        "| setting | strategy | final acc | best acc | MB |\n"
        "|---|---|---|---|---|\n"
        "| iid | scaffold | 0.950 ± 0.013 | 0.960 ± 0.010 | 2.50 |\n"
    )
    assert format_markdown([], target=0.925).startswith(
        "| setting | strategy | final acc | best acc | rounds to 92.5% | sim time to 92.5% | MB |"
    )


def test_one_seed_shows_n_equals_1_not_a_zero_spread():
    one = compare_rows([cell("fedavg", "iid", 0, run_rows([0.1, 0.9], dt=1.0))], target=None)
    assert one[0]["seeds"] == 1
    assert "| iid | fedavg | 0.900 (n=1) | 0.900 (n=1) | 0.00 |" in format_markdown(
        one, target=None
    )


def test_run_result_repr_counts_rows_instead_of_printing_them(tmp_path):
    from fedopt.simulation import RunResult

    rows = [{"round": r} for r in range(50)]
    got = repr(RunResult(tmp_path, rows, {"status": "completed", "final_accuracy": 0.91234}))
    assert got == (
        f"RunResult(run_dir={str(tmp_path)!r}, rows=50, status='completed', final_accuracy=0.9123)"
    )


def test_mean_curve_round_grid_and_interpolation():
    a = [{"round": r, "sim_time": 10.0 * r, "central_accuracy": 0.5 * r} for r in range(3)]
    b = [{"round": r, "sim_time": 20.0 * r, "central_accuracy": 0.25 * r} for r in range(4)]
    grid, mean, std = mean_curve([a, b], "central_accuracy", x="round", interpolate=False)
    assert grid.tolist() == [0.0, 1.0, 2.0]
    assert mean.tolist() == [0.0, 0.375, 0.75]
    assert std.tolist() == [0.0, 0.125, 0.25]
    grid, mean, std = mean_curve([a, b], "central_accuracy", x="sim_time", interpolate=True)
    assert len(grid) == 200 and grid[0] == 0.0 and grid[-1] == 20.0
    np.testing.assert_allclose(mean, grid * (0.05 + 0.0125) / 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, grid * (0.05 - 0.0125) / 2, rtol=0, atol=1e-12)
    grid, mean, std = mean_curve([b], "central_accuracy", x="sim_time", interpolate=True)
    assert grid.tolist() == [0.0, 20.0, 40.0, 60.0] and std.tolist() == [0.0] * 4
    assert mean_curve([[{"round": 0}]], "central_accuracy", x="round", interpolate=False) is None


def test_write_compare_files(tmp_path):
    out = write_compare(make_cells(), tmp_path / "cmp", target=0.9, title="Toy comparison")
    assert out["markdown"] == tmp_path / "cmp" / "comparison.md"
    assert out["csv"] == tmp_path / "cmp" / "comparison.csv"
    names = [p.name for p in out["plots"]]
    assert names == [
        f"compare_{s}_{x}.png"
        for s in ("iid", "noniid-0.1")
        for x in ("round", "sim_time", "cum_bytes", "loss")
    ]
    for path in out["plots"]:
        assert path.read_bytes()[:8] == PNG_MAGIC
    md = out["markdown"].read_text()
    assert md.startswith("# Toy comparison\n\n| setting | strategy |")
    assert format_markdown(compare_rows(make_cells(), target=0.9), target=0.9) in md
    assert "1.5 (2/3)" in md and "16.0 (2/3)" in md
    with open(out["csv"], newline="") as fh:
        records = list(csv.reader(fh))
    assert records[0] == list(COMPARE_COLUMNS)
    assert records[1][:3] == ["iid", "fedavg", "3"]
    assert records[1][7:] == ["1.5", "2", "16.0", "4600.0", "32.0"]
    assert records[2][-5:] == ["3.0", "1", "15.0", "4500.0", "15.0"]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == sorted(
        ["comparison.md", "comparison.csv", *names]
    )
