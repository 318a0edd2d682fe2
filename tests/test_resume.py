"""fedopt resume: scenario checks, resumes.jsonl, metrics.jsonl cut back, the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

import fedopt.simulation
from fedopt.checkpoint import save_checkpoint
from fedopt.cli import main
from fedopt.config import load_scenario
from fedopt.errors import ConfigError, RunError, RunInterrupted
from fedopt.report import MetricsLog, read_metrics
from fedopt.resume import flatten, plan_resume, resume, scenario_changes
from fedopt.simulation import RunResult

ROOT = Path(__file__).resolve().parents[1]


def row(r: int) -> dict:
    return {
        "round": r,
        "central_accuracy": 0.1 * r,
        "train_loss": float("nan") if r == 0 else 1.0 / r,
        "sim_time": 2.0 * r,
        "cum_bytes": 100 * r,
    }


def stopped_run(tmp_path: Path, *, ckpt_round: int = 3, written: int = 5) -> tuple[Path, object]:
    """A run directory as a run stopped after ``written`` rounds leaves it."""
    scenario = load_scenario(ROOT / "scenarios/quickstart.toml", ["run.rounds=8"])
    run_dir = tmp_path / "quickstart" / "20250101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "scenario.toml").write_text(tomli_w.dumps(scenario.to_dict()))
    with MetricsLog(run_dir / "metrics.jsonl") as log:
        for r in range(written + 1):
            log.append(row(r))
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 6, "centr')  # torn by the kill
    if ckpt_round is not None:
        payload = {
            "format": 1,
            "round": ckpt_round,
            "fingerprint": scenario.fingerprint(),
            "scenario": scenario.to_dict(),
            "rows": [row(r) for r in range(ckpt_round + 1)],
            "driver": {"rng": [1, 2, 3]},
            "clients": {},
        }
        save_checkpoint(run_dir, payload, round_=ckpt_round)
    return run_dir, scenario


class FakeRunBatch:
    """Records what ``run_batch`` is called with; emits one row per remaining round.

    Like the real one, it runs each run's ``before`` hook once "the engine is
    up"; ``error`` is raised after that, ``start_error`` before (a failed start).
    """

    def __init__(
        self, error: BaseException | None = None, start_error: BaseException | None = None
    ) -> None:
        self.calls: list[tuple] = []
        self.error = error
        self.start_error = start_error

    def __call__(self, scenarios, run_dirs, *, on_row=None, restore=None, **kwargs):
        self.calls.append((scenarios, run_dirs, restore, kwargs))
        if self.start_error is not None:
            raise self.start_error
        for hook in kwargs.get("before") or []:
            if hook is not None:
                hook()
        if self.error is not None:
            raise self.error
        start = restore[0].round + 1
        for r in range(start, scenarios[0].run.rounds + 1):
            if on_row is not None:
                on_row(0, row(r))
        summary = {"final_accuracy": 0.8, "best_accuracy": 0.8, "best_round": 8, "sim_time": 16.0}
        return [RunResult(run_dir=run_dirs[0], rows=[], summary=summary)]


@pytest.fixture
def fake(monkeypatch):
    f = FakeRunBatch()
    monkeypatch.setattr(fedopt.simulation, "run_batch", f)
    return f


def test_scenario_written_by_a_run_resumes_unchanged():
    scenario = load_scenario(ROOT / "scenarios/quickstart.toml")
    again = load_scenario(ROOT / "scenarios/quickstart.toml", ["run.seed=0"])
    assert scenario.fingerprint() == again.fingerprint()
    assert flatten({"run": {"seed": 1, "x": {"y": 2}}, "name": "q"}) == {
        "run.seed": 1,
        "run.x.y": 2,
        "name": "q",
    }
    assert scenario_changes({"run": {"seed": 1}}, {"run": {"seed": 2, "workers": 4}}) == {
        "run.seed": (1, 2),
        "run.workers": (None, 4),
    }


def test_resume_cuts_metrics_back_and_passes_the_checkpoint(tmp_path, fake):
    run_dir, scenario = stopped_run(tmp_path)
    seen = []
    result = resume(run_dir, on_row=seen.append)
    assert result.summary["final_accuracy"] == 0.8
    [(scenarios, run_dirs, restore, _)] = fake.calls
    assert scenarios == [scenario] and run_dirs == [run_dir]
    [ck] = restore
    assert ck.round == 3 and ck.path.name == "round-000003.ckpt"
    assert ck.payload["driver"] == {"rng": [1, 2, 3]}
    assert [r["round"] for r in seen] == [4, 5, 6, 7, 8]
    # metrics.jsonl holds exactly the checkpoint's rows, as MetricsLog writes them
    expected = tmp_path / "expected"
    with MetricsLog(expected / "metrics.jsonl") as log:
        for r in range(4):
            log.append(row(r))
    assert (run_dir / "metrics.jsonl").read_bytes() == (expected / "metrics.jsonl").read_bytes()
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
    assert read_metrics(run_dir)[0]["train_loss"] is None
    [entry] = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert entry["from_round"] == 3 and entry["forced"] is False and entry["changed"] == {}
    assert entry["checkpoint"] == "round-000003.ckpt"
    assert entry["fingerprint"] == entry["from_fingerprint"] == scenario.fingerprint()


def test_changed_scenario_is_refused_naming_the_keys(tmp_path, fake):
    run_dir, _ = stopped_run(tmp_path)
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError) as info:
        resume(run_dir, sets=["client.lr=0.05", "run.rounds=12"])
    message = str(info.value)
    assert "client.lr: 0.2 -> 0.05" in message and "run.rounds: 8 -> 12" in message
    assert "--force" in message and "\n" not in message
    assert fake.calls == [] and not (run_dir / "resumes.jsonl").exists()
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_force_records_the_change(tmp_path, fake):
    run_dir, _ = stopped_run(tmp_path)
    resume(run_dir, sets=["run.rounds=12"], force=True)
    [(scenarios, _, _, _)] = fake.calls
    assert scenarios[0].run.rounds == 12
    [entry] = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert entry["forced"] is True
    assert entry["changed"] == {"run.rounds": {"old": 8, "new": 12}}
    assert entry["fingerprint"] != entry["from_fingerprint"]
    resume(run_dir, sets=["run.rounds=12"], force=True)  # a second resume appends a line
    assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 2


def test_other_scenario_file_and_ray_address(tmp_path, fake):
    run_dir, scenario = stopped_run(tmp_path)
    other = tmp_path / "other.toml"
    other.write_text(tomli_w.dumps(scenario.to_dict()))
    plan = plan_resume(run_dir, scenario_path=other, ray_address="10.0.0.1:6379")
    assert plan.scenario.run.ray_address == "10.0.0.1:6379"
    assert not plan.forced and plan.changed == {"run.ray_address": (None, "10.0.0.1:6379")}
    with pytest.raises(ConfigError, match="data.name: 'digits' -> 'blobs'"):
        plan_resume(run_dir, scenario_path=other, sets=["data.name=blobs"])


def test_newest_verified_checkpoint_is_used(tmp_path, fake):
    run_dir, _ = stopped_run(tmp_path)
    torn = save_checkpoint(run_dir, {"round": 5}, round_=5, keep=3)
    torn.write_bytes(torn.read_bytes()[:-10])
    assert plan_resume(run_dir).checkpoint.round == 3


def test_no_checkpoint_and_no_directory(tmp_path, fake):
    run_dir, _ = stopped_run(tmp_path, ckpt_round=None)
    with pytest.raises(RunError, match=f"{run_dir} has no checkpoint to resume from"):
        resume(run_dir)
    with pytest.raises(ConfigError, match="an existing run directory"):
        resume(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="scenario.toml"):
        resume(empty)
    assert fake.calls == []


def test_cli_exit_codes(tmp_path, fake, capsys):
    run_dir, _ = stopped_run(tmp_path)
    assert main(["resume", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"resuming {run_dir} after round 3" in out and "final accuracy 0.8000" in out
    assert fake.calls[-1][2][0].round == 3

    assert main(["resume", str(run_dir), "--set", "run.rounds=9"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "run.rounds: 8 -> 9" in err
    assert main(["resume", str(run_dir), "--set", "run.rounds=9", "--force"]) == 0
    assert "resuming with a changed scenario (--force, recorded)" in capsys.readouterr().out

    bare, _ = stopped_run(tmp_path / "bare", ckpt_round=None)
    assert main(["resume", str(bare)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no checkpoint to resume from" in err


def test_interrupted_run_and_resume_exit_130(tmp_path, monkeypatch, capsys):
    run_dir, _ = stopped_run(tmp_path)
    stopped = RunInterrupted(6, run_dir, "SIGTERM")
    monkeypatch.setattr(fedopt.simulation, "run_batch", FakeRunBatch(error=stopped))
    assert main(["resume", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after round 6; continue with: fedopt resume {run_dir}" in err

    def stopped_run_call(*args, **kwargs):
        raise RunInterrupted(2, tmp_path / "r", "SIGINT")

    monkeypatch.setattr(fedopt.simulation, "run", stopped_run_call)
    code = main(["run", str(ROOT / "scenarios/quickstart.toml"), "--out", str(tmp_path)])
    assert code == 130
    assert "stopped by SIGINT after round 2; continue with" in capsys.readouterr().err


def _snapshot(run_dir):
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_resume_that_cannot_start_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    run_dir, _ = stopped_run(tmp_path)
    before = _snapshot(run_dir)
    failed = FakeRunBatch(start_error=ConfigError("run.ray_address", "h:1", "a Ray cluster"))
    monkeypatch.setattr(fedopt.simulation, "run_batch", failed)
    with pytest.raises(ConfigError, match="a Ray cluster"):
        resume(run_dir, sets=["run.rounds=12"], force=True)
    assert _snapshot(run_dir) == before  # no record, no cut, no rewritten scenario


def test_a_run_without_its_scenario_file_resumes_from_the_checkpoint(tmp_path, fake):
    run_dir, scenario = stopped_run(tmp_path)
    (run_dir / "scenario.toml").unlink()
    resume(run_dir)
    [(scenarios, _, _, _)] = fake.calls
    assert scenarios == [scenario]
    assert load_scenario(run_dir / "scenario.toml") == scenario  # written back once started


def test_a_finished_run_is_reported_not_recomputed(tmp_path, fake, capsys):
    run_dir, scenario = stopped_run(tmp_path)
    resume(run_dir)  # finish it (the fake writes no summary: write the one a run writes)
    rows = [row(r) for r in range(scenario.run.rounds + 1)]
    with MetricsLog(tmp_path / "full" / "metrics.jsonl") as log:
        for r in rows:
            log.append(r)
    (run_dir / "metrics.jsonl").write_bytes((tmp_path / "full" / "metrics.jsonl").read_bytes())
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    before = _snapshot(run_dir)
    fake.calls.clear()
    assert main(["resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "already finished its 8 rounds; nothing to resume" in out
    assert fake.calls == [] and _snapshot(run_dir) == before
