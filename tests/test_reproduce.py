"""The reproduction suite: every paper sweep states claims and a quick tier; the quick tier runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest

from fedopt.compare import load_sweep
from fedopt.errors import ConfigError
from fedopt.repro_report import Section, load_sections, render, sweep_digest
from fedopt.reproduce import PAPERS_DIR, find_sweeps, reproduce


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
        for *_, sc in quick.cells():  # a few rounds, or a few simulated seconds (async)
            budget = getattr(sc.strategy.params, "time_budget", None)
            assert sc.run.rounds <= 3 or (budget is not None and budget <= 3), path.name


def test_an_unknown_sweep_name_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        find_sweeps(only=["fedsgd"])
    assert info.value.key == "--only" and "dp_sgd" in str(info.value)
    with pytest.raises(ConfigError):
        find_sweeps(tmp_path)


def _section(name: str, holds: tuple[bool, ...], **kw) -> Section:
    verdicts = tuple((f"claim {i}", h, f"detail {i}") for i, h in enumerate(holds))
    base = dict(
        name=name,
        paper="P",
        seeds=(0, 1, 2),
        quick=False,
        out_dir="runs/x",
        wall_s=60.0,
        table="| t |",
        tuning="",
        diagnosis="| diag |",
        plot="",
        verdicts=verdicts,
        digest="d0",
        measured="2026-12-03 12:00 UTC",
        commit="abc123",
    )
    return Section(**{**base, **kw})


def test_render_counts_sweeps_whose_claims_all_hold_and_diagnoses_the_rest():
    text = render([_section("a", (True, True)), _section("b", (True, False))], quick=False)
    assert "**1 of 2 sweeps: every claim holds.**" in text
    assert "Claim rows that hold: 3 of 4 (a 2/2, b 1/2)." in text
    assert text.count("**does not hold**") == 2  # summary row and section line
    assert text.count("| diag |") == 1  # only the failing sweep is diagnosed
    assert "2.0 minutes" in text and "full tier" in text
    assert "Measured 2026-12-03 12:00 UTC, commit abc123, 1.0 min" in text


def test_claim_rows_render_with_their_numbers():
    section = _section("s", (), verdicts=(("a beats b", True, "s: a over b +0.25 ± 0.05 SE"),))
    text = render([section], quick=True)
    assert "| s | P | a beats b | **holds** | s: a over b +0.25 ± 0.05 SE |" in text
    assert "quick tier" in text


def test_a_section_measured_on_another_definition_is_marked_stale():
    text = render(
        [_section("a", (True,)), _section("b", (True,))],
        quick=False,
        current={"a": "d0", "b": "d1"},
    )
    assert "## a\n" in text and "## b (stale)" in text
    assert "Stale (the sweep changed since it was measured): b." in text


def test_sections_round_trip_through_json_and_tiers_stay_apart(tmp_path):
    full, quick = _section("a", (True, False)), _section("a", (True,), quick=True)
    (tmp_path / "a.json").write_text(json.dumps(asdict(full)))
    (tmp_path / "q.json").write_text(json.dumps(asdict(quick)))
    (tmp_path / "torn.json").write_text("{")
    assert load_sections(tmp_path, quick=False) == {"a": full}
    assert load_sections(tmp_path, quick=True) == {"a": quick}


def test_the_digest_follows_the_sweep_definition():
    a = load_sweep(PAPERS_DIR / "dp_sgd.toml")
    b = load_sweep(PAPERS_DIR / "dp_sgd.toml", sets=["run.rounds=3"])
    assert sweep_digest(a) == sweep_digest(load_sweep(PAPERS_DIR / "dp_sgd.toml"))
    assert sweep_digest(a) != sweep_digest(b)
    assert sweep_digest(a) != sweep_digest(load_sweep(PAPERS_DIR / "dp_sgd.toml", quick=True))


@pytest.mark.slow
def test_the_quick_tier_of_the_whole_suite_runs_and_reports(tmp_path):
    # the suite copied, plus a sweep not rerun now whose stored section must be kept (stale:
    # measured on another definition) and a stored section of a sweep no longer in the suite
    papers = tmp_path / "scenarios" / "papers"
    papers.mkdir(parents=True)
    for path in PAPERS_DIR.parent.glob("*.toml"):  # bases the sweeps may name
        shutil.copyfile(path, papers.parent / path.name)
    for path in find_sweeps():
        shutil.copyfile(path, papers / path.name)
    text = (PAPERS_DIR / "dp_sgd.toml").read_text().replace('name = "dp_sgd"', 'name = "extra"')
    (papers / "extra.toml").write_text(text)
    report = tmp_path / "reproductions.md"
    (tmp_path / "reproductions").mkdir()
    for name in ("extra", "gone"):
        kept = _section(name, (True,), quick=True, digest="old")
        (tmp_path / "reproductions" / f"{name}.json").write_text(json.dumps(asdict(kept)))
    paths = [p for p in find_sweeps(papers) if p.stem != "extra"]
    results = reproduce(paths, quick=True, out=tmp_path / "runs", report=report)
    text = report.read_text()
    assert len(results) == len(find_sweeps())
    for result in results:
        assert result.verdicts, result.sweep.name
        assert all(v.seeds == 1 and v.stderr is None for v in result.verdicts)
        assert f"## {result.sweep.name}\n" in text
        assert (tmp_path / "reproductions" / f"{result.sweep.name}.png").stat().st_size > 1000
        stored = load_sections(tmp_path / "reproductions", quick=True)[result.sweep.name]
        assert stored.digest == sweep_digest(result.sweep)
        assert [v[1] for v in stored.verdicts] == [v.holds for v in result.verdicts]
    assert "## extra (stale)" in text and "## gone" not in text
    # a verdict follows from its own numbers: beats with one seed holds iff advantage > margin
    for result in results:
        for v in result.verdicts:
            if v.claim.kind == "beats":
                assert v.holds == (v.estimate > v.claim.margin)


def test_rebuild_writes_the_report_from_stored_sections_only(tmp_path):
    from fedopt.reproduce import rebuild

    digest = sweep_digest(load_sweep(PAPERS_DIR / "dp_sgd.toml"))
    folder = tmp_path / "reproductions"
    folder.mkdir()
    for section in (_section("dp_sgd", (True,), digest=digest), _section("fedhyper", (False,))):
        (folder / f"{section.name}.json").write_text(json.dumps(asdict(section)))
    report = tmp_path / "reproductions.md"
    assert rebuild(PAPERS_DIR, report) == 2
    text = report.read_text()
    assert "## dp_sgd\n" in text and "## fedhyper (stale)" in text
    assert "**1 of 2 sweeps: every claim holds.**" in text
    assert not list(tmp_path.glob("runs*"))  # nothing ran
