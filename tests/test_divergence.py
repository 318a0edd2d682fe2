"""The blow-up rule: a loss that stays far above its start stops the run, rows kept."""

from __future__ import annotations

import json
import math

import pytest
from inline import execute_inline

from fedopt.config import load_scenario
from fedopt.divergence import check_blowup
from fedopt.errors import ConfigError, DivergenceError

QUICK = "scenarios/quickstart.toml"


def _rows(losses, key="train_loss"):
    return [{"round": i + 1, key: v} for i, v in enumerate(losses)]


def test_rounds_above_factor_times_the_first_loss_stop():
    rows = _rows([2.0, 201.0, 250.0, 201.0])
    with pytest.raises(DivergenceError) as info:
        check_blowup(rows, factor=100.0, rounds=3)
    assert info.value.round == 4
    assert str(info.value) == (
        "training diverged in round 4: train_loss 201 above 200 (run.diverge_factor = 100 x "
        "max(first train_loss 2, 1)) for 3 rounds in a row"
    )


@pytest.mark.parametrize(
    "losses",
    [
        [2.0, 250.0, 250.0, 199.0],  # the last round came back under 200
        [2.0, 250.0, 250.0],  # only two rounds above
        [0.01, 50.0, 60.0, 70.0],  # the floor of 1: the limit is 100, not 1
    ],
)
def test_losses_under_the_limit_or_too_few_rounds_do_not_stop(losses):
    check_blowup(_rows(losses), factor=100.0, rounds=3)


def test_the_rule_reads_the_central_loss_first_and_can_be_off():
    rows = [{"round": 0, "central_loss": 2.3}] + _rows([500.0, 600.0], key="central_loss")
    rows[1]["train_loss"] = rows[2]["train_loss"] = 1.0  # not read: the central loss is there
    with pytest.raises(DivergenceError, match="central_loss 600 above 230"):
        check_blowup(rows, factor=100.0, rounds=2)
    check_blowup(rows, factor=0.0, rounds=2)
    check_blowup([{"round": 1, "central_loss": math.inf}], factor=100.0, rounds=1)


def test_bad_rule_settings_are_named():
    with pytest.raises(ConfigError, match="run.diverge_factor = -1.0 is not allowed"):
        load_scenario(QUICK, ["run.diverge_factor=-1"])
    with pytest.raises(ConfigError, match="run.diverge_rounds = 0 is not allowed"):
        load_scenario(QUICK, ["run.diverge_rounds=0"])


def _execute(run_dir, sets):
    return execute_inline(load_scenario(QUICK, sets), run_dir)


def test_a_huge_rate_that_never_goes_non_finite_is_stopped_with_its_rows(tmp_path):
    sets = ["run.rounds=8", "client.lr=1e6", "run.fed_eval_every=0", "run.checkpoint_every=0"]
    with pytest.raises(DivergenceError, match="above .* for 3 rounds in a row") as info:
        _execute(tmp_path / "on", sets)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == info.value.round < 8
    assert all(math.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["status"].startswith("failed: training diverged")
    extra = _execute(tmp_path / "off", [*sets, "run.diverge_factor=0"])  # the rule off
    assert extra["status"] == "completed"
