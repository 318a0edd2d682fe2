"""Tests of fedopt.report (metrics log, CSV, summary, atomic writes) and fedopt.plots.plot_run."""

from __future__ import annotations

import json
import math
import os

import pytest

from fedopt import report
from fedopt.errors import ConfigError
from fedopt.plots import plot_run, slug

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PNGS = [
    "accuracy_vs_round.png",
    "loss_vs_round.png",
    "accuracy_vs_sim_time.png",
    "accuracy_vs_bytes.png",
    "loss_vs_sim_time.png",
    "loss_vs_bytes.png",
]


def make_rows() -> list[dict]:
    """Four rounds; central accuracy peaks in round 2, fed accuracy stops after round 2."""
    return [
        {
            "round": 0,
            "sim_time": 0.0,
            "cum_bytes": 0,
            "central_loss": 2.3,
            "central_accuracy": 0.1,
            "fed_loss": 2.2,
            "fed_accuracy": 0.12,
            "wall_time": 0.5,
        },
        {
            "round": 1,
            "sim_time": 10.0,
            "round_sim_time": 10.0,
            "num_clients": 2,
            "clients": [0, 3],
            "bytes_down": 100,
            "bytes_up": 80,
            "cum_bytes": 180,
            "train_loss": 1.5,
            "train_accuracy": 0.5,
            "central_loss": 1.2,
            "central_accuracy": 0.6,
            "fed_loss": 1.1,
            "fed_accuracy": 0.65,
            "fed_accuracy_worst10": 0.4,
            "per_client": {"0": {"loss": 1.4}, "3": {"loss": 1.6}},
            "wall_time": 2.0,
        },
        {
            "round": 2,
            "sim_time": 25.5,
            "bytes_down": 100,
            "bytes_up": 90,
            "cum_bytes": 370,
            "train_loss": 0.9,
            "central_loss": 0.8,
            "central_accuracy": 0.75,
            "fed_loss": 0.85,
            "fed_accuracy": 0.7,
            "wall_time": 3.25,
        },
        {
            "round": 3,
            "sim_time": 40.0,
            "bytes_down": 100,
            "bytes_up": 70,
            "cum_bytes": 540,
            "train_loss": 0.7,
            "central_loss": 0.95,
            "central_accuracy": 0.72,
            "wall_time": 4.0,
        },
    ]


def strip_central(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("central_")} for r in rows]


def write_log(path, rows) -> None:
    with report.MetricsLog(path) as log:
        for row in rows:
            log.append(row)


def test_metrics_log_appends_and_fsyncs_each_row(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    rows = make_rows()
    log = report.MetricsLog(tmp_path / "deep" / "run" / "metrics.jsonl")
    for i, row in enumerate(rows, start=1):
        log.append(row)
        assert len(synced) == i
        assert report.read_metrics(tmp_path / "deep" / "run") == rows[:i]
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append({"round": 9})
    # reopening appends instead of truncating
    with report.MetricsLog(tmp_path / "deep" / "run" / "metrics.jsonl") as again:
        again.append({"round": 4})
    assert [r["round"] for r in report.read_metrics(tmp_path / "deep" / "run")] == [0, 1, 2, 3, 4]


def test_non_finite_floats_are_written_as_null(tmp_path):
    row = {
        "round": 1,
        "a": float("nan"),
        "b": float("inf"),
        "ok": 1.25,
        "per_client": {7: {"loss": float("-inf"), "hist": (1, 2)}},
    }
    write_log(tmp_path / "metrics.jsonl", [row])
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token):
        raise AssertionError(token)

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == {
        "round": 1,
        "a": None,
        "b": None,
        "ok": 1.25,
        "per_client": {"7": {"loss": None, "hist": [1, 2]}},
    }


def test_torn_last_line_is_ignored_and_repaired_on_reopen(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = make_rows()[:2]
    write_log(path, rows)
    with open(path, "a") as fh:
        fh.write('{"round": 2, "sim_ti')
    assert report.read_metrics(tmp_path) == rows
    with report.MetricsLog(path) as log:
        log.append({"round": 2, "sim_time": 3.0})
    assert report.read_metrics(tmp_path) == [*rows, {"round": 2, "sim_time": 3.0}]
    assert path.read_text().count("\n") == 3


def test_complete_but_unterminated_last_line_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}')
    assert report.read_metrics(tmp_path) == [{"round": 0}, {"round": 1}]
    write_log(path, [{"round": 2}])
    assert path.read_text() == '{"round": 0}\n{"round": 1}\n{"round": 2}\n'


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ConfigError, match="line 2") as err:
        report.read_metrics(tmp_path)
    assert err.value.key == "run_dir"


def test_csv_columns_are_exact(tmp_path):
    rows = [
        {"sim_time": 0.0, "round": 0, "central_accuracy": 0.1},
        {
            "round": 1,
            "sim_time": 1.5,
            "clients": [1, 2],
            "per_client": {"1": {"loss": 0.5}},
            "bytes_up": 7,
            "central_accuracy": float("nan"),
            "epsilon_max": 0.25,
            "note": "x",
        },
    ]
    path = report.write_metrics_csv(rows, tmp_path / "metrics.csv")
    assert path.read_text() == (
        "round,sim_time,central_accuracy,bytes_up,epsilon_max,note\n0,0.0,0.1,,,\n1,1.5,,7,0.25,x\n"
    )
    full = report.write_metrics_csv(make_rows(), tmp_path / "full.csv").read_text()
    assert full.splitlines()[0].split(",") == [
        "round",
        "sim_time",
        "cum_bytes",
        "central_loss",
        "central_accuracy",
        "fed_loss",
        "fed_accuracy",
        "wall_time",
        "round_sim_time",
        "num_clients",
        "bytes_down",
        "bytes_up",
        "train_loss",
        "train_accuracy",
        "fed_accuracy_worst10",
    ]
    assert full.splitlines()[3] == "2,25.5,370,0.8,0.75,0.85,0.7,3.25,,,100,90,0.9,,"


def test_summarize_prefers_central_accuracy():
    rows = make_rows()
    assert report.accuracy_key(rows) == "central_accuracy"
    assert report.loss_key(rows) == "central_loss"
    assert report.summarize(rows, extra={"seed": 7, "rounds_note": "x"}) == {
        "rounds": 3,
        "accuracy_metric": "central_accuracy",
        "final_accuracy": 0.72,
        "best_accuracy": 0.75,
        "best_round": 2,
        "final_loss": 0.95,
        "best_loss": 0.8,
        "final_train_loss": 0.7,
        "sim_time": 40.0,
        "bytes_down_total": 300,
        "bytes_up_total": 240,
        "bytes_total": 540,
        "wall_time": 4.0,
        "seed": 7,
        "rounds_note": "x",
    }


def test_summarize_uses_fed_accuracy_without_central():
    rows = strip_central(make_rows())
    rows[3]["train_loss"] = math.nan
    summary = report.summarize(rows)
    assert list(summary) == list(report.SUMMARY_KEYS)
    assert summary == {
        "rounds": 3,
        "accuracy_metric": "fed_accuracy",
        "final_accuracy": 0.7,
        "best_accuracy": 0.7,
        "best_round": 2,
        "final_loss": 0.85,
        "best_loss": 0.85,
        "final_train_loss": 0.9,
        "sim_time": 40.0,
        "bytes_down_total": 300,
        "bytes_up_total": 240,
        "bytes_total": 540,
        "wall_time": 4.0,
    }


def test_summarize_without_evaluation_or_rows():
    assert report.accuracy_key([{"round": 0, "train_loss": 1.0}]) is None
    empty = report.summarize([])
    assert empty["rounds"] is None and empty["accuracy_metric"] is None
    assert empty["final_accuracy"] is None and empty["bytes_total"] == 0


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    path = tmp_path / "summary.json"
    report.write_json_atomic(path, {"a": 1, "b": float("nan"), "c": (1.5, 2)})
    assert json.loads(path.read_text()) == {"a": 1, "b": None, "c": [1.5, 2]}
    report.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        report.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_run_files_and_regenerate(tmp_path):
    run = tmp_path / "run"
    write_log(run / "metrics.jsonl", make_rows())
    extra = {"seed": 3, "scenario": "toy", "versions": {"flwr": "1.41.0"}}
    summary = report.write_run_files(run, report.read_metrics(run), extra=extra)
    assert summary["final_accuracy"] == 0.72 and summary["seed"] == 3
    assert json.loads((run / "summary.json").read_text()) == summary
    first_csv = (run / "metrics.csv").read_text()
    for name in RUN_PNGS:
        assert (run / name).read_bytes()[:8] == PNG_MAGIC

    # damage everything derived; keep only metrics.jsonl and a stale summary
    for name in [*RUN_PNGS, "metrics.csv"]:
        (run / name).unlink()
    stale = {**summary, "final_accuracy": 0.0, "bytes_total": -1}
    (run / "summary.json").write_text(json.dumps(stale))
    rebuilt = report.regenerate(run)
    assert rebuilt == summary
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "metrics.csv").read_text() == first_csv
    for name in RUN_PNGS:
        assert (run / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    # with no summary.json at all only the metrics remain
    (run / "summary.json").unlink()
    assert report.regenerate(run) == report.summarize(make_rows())


def test_regenerate_missing_run_dir(tmp_path):
    with pytest.raises(ConfigError) as err:
        report.regenerate(tmp_path / "nope")
    assert err.value.key == "run_dir"
    assert err.value.value == str(tmp_path / "nope")
    assert "metrics.jsonl" in err.value.allowed


def test_plot_run_skips_absent_figures(tmp_path):
    rows = [{"round": r, "train_loss": 1.0 / (r + 1)} for r in range(4)]
    assert plot_run(rows, tmp_path, title="t") == [tmp_path / "loss_vs_round.png"]
    assert (tmp_path / "loss_vs_round.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_run([], tmp_path / "empty", title="t") == []
    fed = plot_run(strip_central(make_rows()), tmp_path / "fed", title="t")
    assert [p.name for p in fed] == RUN_PNGS


def test_slug_is_filesystem_safe():
    assert slug("Dirichlet α=0.1 / 10 clients") == "Dirichlet-0.1-10-clients"
    assert slug("../..") == "x"
    assert slug("iid") == "iid"
