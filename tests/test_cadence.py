"""``checkpoint_every = "auto"``: the cadence follows the measured cost, and resumes stay exact."""

from __future__ import annotations

import pytest
from inline import scenario_with, strip_wall
from test_resume_runs import RAW, KilledError, execute, raw_for

from fedopt import resumable
from fedopt.checkpoint import latest_checkpoint
from fedopt.errors import ConfigError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_cadence_keeps_checkpoints_under_five_percent(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(resumable.time, "monotonic", clock)
    cadence = resumable.Cadence()
    written = []
    for round_ in range(1, 16):
        clock.now += 1.0  # every round takes 1 s
        cadence.tick(round_)
        cadence.tick(round_)  # asking twice about a round measures it once
        if cadence.due(round_):
            clock.now += 0.2  # a checkpoint takes 0.2 s: k = ceil(0.2 / (0.05 * 1)) = 4
            cadence.wrote(round_, 0.2)
            written.append(round_)
    assert written == [1, 2, 6, 10, 14]


def test_a_checkpoint_cheaper_than_five_percent_of_a_round_is_written_every_round(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(resumable.time, "monotonic", clock)
    cadence = resumable.Cadence()
    for round_ in (1, 2, 3):
        clock.now += 1.0
        cadence.tick(round_)
        assert cadence.due(round_)
        cadence.wrote(round_, 0.01)


@pytest.mark.parametrize("raw", [RAW, raw_for("strategy", "fedfix")], ids=["sync", "async"])
def test_an_auto_cadence_run_resumes_to_the_uninterrupted_rows(tmp_path, raw):
    sc = scenario_with(raw, run__checkpoint_every="auto")
    whole = execute(sc, tmp_path / "whole")
    assert latest_checkpoint(tmp_path / "whole") is not None
    with pytest.raises(KilledError):
        execute(sc, tmp_path / "cut", kill_after=3)
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and 1 <= ckpt.round <= 3
    resumed = execute(sc, tmp_path / "cut", restore=ckpt)
    assert strip_wall(resumed) == strip_wall(whole)


def test_checkpoint_every_takes_an_integer_or_auto():
    with pytest.raises(ConfigError, match="checkpoint_every = 'often'.*'auto'"):
        scenario_with(RAW, run__checkpoint_every="often")
    with pytest.raises(ConfigError, match='checkpoint_every = -1.*or "auto"'):
        scenario_with(RAW, run__checkpoint_every=-1)
