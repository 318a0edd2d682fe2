"""The terminal says what start-up is doing until round 1, then shows the round bar."""

from __future__ import annotations

import io

from rich.console import Console

from fedopt.cli import _Display


def test_status_lines_until_round_one_then_the_bar():
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    display = _Display(console, total=3)
    display.status("building the task: data, partition, model")
    assert display._spinning and not display.bar.live.is_started
    display.row({"round": 0, "central_accuracy": 0.1})  # the untrained model: still starting
    assert display._spinning and not display.bar.live.is_started
    display.row({"round": 1, "train_loss": 2.0, "central_accuracy": 0.5, "cum_bytes": 10})
    assert not display._spinning and display.bar.live.is_started
    display.status("ignored once the bar runs")
    assert not display._spinning
    display.stop()
    assert not display.bar.live.is_started
