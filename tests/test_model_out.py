"""Models out: model_final.pt and model_best.pt rebuild the exact models behind the rows."""

from __future__ import annotations

import json

import pytest
from inline import execute_inline

from fedopt.cli import main
from fedopt.config import load_scenario
from fedopt.errors import ConfigError
from fedopt.model_out import MODEL_BEST, MODEL_FINAL, load_model
from fedopt.simulation import load_result
from fedopt.task import as_tensors, build_task
from fedopt.training import evaluate

QUICK = "scenarios/quickstart.toml"


def _run(run_dir, sets):
    execute_inline(load_scenario(QUICK, sets), run_dir)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_final_and_best_models_score_exactly_as_their_rows(tmp_path, capsys):
    rows = _run(tmp_path, ["run.rounds=4", "run.fed_eval_every=0", "client.lr=0.5"])
    final = load_result(tmp_path).model()
    x, y = as_tensors(build_task(load_scenario(QUICK)).data.test, next(final.parameters()).device)
    assert evaluate(final, x, y).accuracy == rows[-1]["central_accuracy"]
    best_row = max(rows, key=lambda r: r["central_accuracy"])  # the first of the best
    model, _, payload = load_model(tmp_path, "best")
    assert payload["round"] == best_row["round"]
    assert payload["central_accuracy"] == best_row["central_accuracy"]
    assert evaluate(model, x, y).accuracy == best_row["central_accuracy"]
    assert main(["eval", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "final model (round 4) on the test set of digits" in out
    assert f"accuracy {rows[-1]['central_accuracy']:.4f}" in out


def test_a_run_dir_without_a_model_and_a_bad_choice_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"a run directory holding {MODEL_FINAL}"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="final | best"):
        load_model(tmp_path, "last")
    (tmp_path / MODEL_BEST).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"a readable {MODEL_BEST}"):
        load_model(tmp_path, "best")
