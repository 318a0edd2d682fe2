"""The fedopt command: partitions, report, list, reference."""

from __future__ import annotations

import json
from pathlib import Path

from fedopt.cli import main
from fedopt.report import MetricsLog

ROOT = Path(__file__).resolve().parents[1]


def test_partitions_prints_sizes_and_writes_heatmap(tmp_path, capsys):
    png = tmp_path / "h.png"
    code = main(
        [
            "partitions",
            str(ROOT / "scenarios/quickstart.toml"),
            "--set",
            "partition.name=dirichlet",
            "--set",
            "partition.alpha=0.1",
            "--png",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "dirichlet partition of digits" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_regenerates_from_metrics(tmp_path, capsys):
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        log.append(
            {
                "round": 0,
                "central_accuracy": 0.1,
                "central_loss": 2.3,
                "sim_time": 0.0,
                "cum_bytes": 0,
            }
        )
        log.append(
            {
                "round": 1,
                "central_accuracy": 0.7,
                "central_loss": 1.0,
                "train_loss": 1.2,
                "sim_time": 3.0,
                "bytes_down": 10,
                "bytes_up": 12,
                "cum_bytes": 22,
            }
        )
    assert main(["report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] == 0.7 and summary["bytes_total"] == 22
    assert (tmp_path / "accuracy_vs_round.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_list_and_reference(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("fedavg", "krum", "dirichlet", "cnn", "fx", "sgd", "adam", "cifar10"):
        assert name in out
    assert main(["reference"]) == 0
    assert "#### `[strategy]`" in capsys.readouterr().out


def test_expert_command_trains_a_loadable_checkpoint(tmp_path, capsys):
    import torch

    from fedopt.config import load_scenario
    from fedopt.task import build_task

    out = tmp_path / "expert.pt"
    quick = str(ROOT / "scenarios/quickstart.toml")
    assert main(["expert", quick, "--out", str(out), "--epochs", "2"]) == 0
    assert "expert model" in capsys.readouterr().out
    model = build_task(load_scenario(quick)).new_model()
    model.load_state_dict(torch.load(out))
    assert main(["expert", quick, "--out", str(out), "--epochs", "0"]) == 2
