"""The reproduction suite: every paper sweep states claims and a quick tier; the quick tier runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedopt.claims import Claim, Verdict
from fedopt.compare import load_sweep
from fedopt.errors import ConfigError
from fedopt.reproduce import PAPERS_DIR, SweepReport, find_sweeps, render, reproduce


def test_every_paper_sweep_has_claims_three_seeds_and_a_quick_tier():
    paths = find_sweeps()
    assert {p.stem for p in paths} >= {"dp_sgd", "fedhyper", "single_merge"}
    for path in paths:
        full, quick = load_sweep(path), load_sweep(path, quick=True)
        assert full.claims, path.name
        assert len(full.seeds) >= 3, path.name
        assert full.paper, path.name
        assert quick.seeds == (0,) and quick.claims, path.name
        assert len(quick.cells()) < len(full.cells()), path.name
        rounds = max(sc.run.rounds for *_, sc in quick.cells())
        assert rounds <= 3, path.name


def test_an_unknown_sweep_name_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        find_sweeps(only=["fedsgd"])
    assert info.value.key == "--only" and "dp_sgd" in str(info.value)
    with pytest.raises(ConfigError):
        find_sweeps(tmp_path)


def _report(tmp_path: Path, holds: tuple[bool, ...]) -> SweepReport:
    sweep = load_sweep(PAPERS_DIR / "dp_sgd.toml")
    claim = sweep.claims[0]
    verdicts = tuple(
        Verdict(claim, h, 0.1 if h else -0.1, 0.01, 3, f"detail {i}") for i, h in enumerate(holds)
    )
    return SweepReport(sweep, tmp_path, "| t |", "", None, verdicts, "| diag |", 60.0)


def test_render_counts_sweeps_whose_claims_all_hold_and_diagnoses_the_rest(tmp_path):
    ok, bad = _report(tmp_path, (True, True)), _report(tmp_path, (True, False))
    text = render([ok, bad], quick=False, report=tmp_path / "r.md")
    assert "**1 of 2 sweeps: every claim holds.**" in text
    assert text.count("**does not hold**") == 2  # summary row and section line
    assert text.count("| diag |") == 1  # only the failing sweep is diagnosed
    assert "2.0 minutes" in text and "full tier" in text


def test_claim_rows_render_with_their_numbers(tmp_path):
    claim = Claim("a beats b", "beats", "a", "b", "final_accuracy", ("s",))
    verdict = Verdict(claim, True, 0.25, 0.05, 3, "s: a over b +0.25 ± 0.05 SE")
    assert verdict.word == "holds"
    rep = _report(tmp_path, ())
    text = render(
        [SweepReport(**{**rep.__dict__, "verdicts": (verdict,)})],
        quick=True,
        report=tmp_path / "r.md",
    )
    assert "| a beats b | **holds** | s: a over b +0.25 ± 0.05 SE |" in text
    assert "quick tier" in text


@pytest.mark.slow
def test_the_quick_tier_of_the_whole_suite_runs_and_reports(tmp_path):
    report = tmp_path / "reproductions.md"
    results = reproduce(find_sweeps(), quick=True, out=tmp_path / "runs", report=report)
    text = report.read_text()
    for result in results:
        assert result.verdicts, result.sweep.name
        assert all(v.seeds == 1 and v.stderr is None for v in result.verdicts)
        assert f"## {result.sweep.name}" in text
        assert (tmp_path / "reproductions" / f"{result.sweep.name}.png").stat().st_size > 1000
    # a verdict follows from its own numbers: beats with one seed holds iff advantage > margin
    for result in results:
        for v in result.verdicts:
            if v.claim.kind == "beats":
                assert v.holds == (v.estimate > v.claim.margin)
