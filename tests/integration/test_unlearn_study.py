"""`halokit unlearn bench --quick` end to end: files, consistent numbers, and NPO keeping more utility than GA."""

import json

import pytest

from halokit.cli import main
from halokit.unlearn_bench import UnlearnSettings


@pytest.fixture(scope="module")
def study(tmp_path_factory, run_quick):
    """The plumbing at smoke size: files, curves, report."""
    return run_quick(["unlearn", "bench"], UnlearnSettings, tmp_path_factory.mktemp("unlearn-smoke"), smoke=True)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, run_quick):
    """The --quick study, large enough for the NPO-vs-GA claim."""
    return run_quick(["unlearn", "bench"], UnlearnSettings, tmp_path_factory.mktemp("unlearn"), smoke=False)


def test_report_and_data_files(study):
    for name in ("results.json", "report.md", "report.html", "curves_10.png", "tradeoff.png", "distance.png",
                 "data/forget10.jsonl", "data/retain10.jsonl", "data/eval.jsonl"):
        assert (study / name).is_file() and (study / name).stat().st_size > 0, name
    assert (study / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["data", "validate", str(study / "data/forget10.jsonl"), "--format", "forget"]) == 0


def test_numbers_are_consistent(study):
    runs = json.loads((study / "results.json").read_text())["runs"]
    assert set(runs) == {"forget10-ga", "forget10-npo", "forget10-npo_rt"}
    for r in runs.values():
        curve = r["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == r["steps"]
        assert curve[0]["weight_distance"] == 0.0 and curve[-1]["weight_distance"] > 0
        assert r["final"]["model_utility"] == curve[-1]["model_utility"]
        for row in curve:
            assert 0.0 <= row["forget_quality"] <= 1.0 and 0.0 <= row["model_utility"] <= 1.0
        # unlearning lowers the probability of the forget answers
        assert curve[-1]["forget/probability"] < curve[0]["forget/probability"]
    # every run starts from the same fine-tuned model
    assert len({round(r["utility_start"], 9) for r in runs.values()}) == 1


@pytest.mark.study
def test_npo_keeps_more_utility_than_ga(quick_study):
    study = quick_study
    """NPO's claim (arXiv 2404.05868): GA's utility collapses as it forgets; NPO's weight on a forgotten
    example vanishes, so it drifts more slowly, and NPO+RT stays useful while forgetting."""
    runs = json.loads((study / "results.json").read_text())["runs"]
    ga, npo, rt = (runs[f"forget10-{m}"] for m in ("ga", "npo", "npo_rt"))
    assert ga["final"]["utility_kept"] < 0.2  # GA collapses ...
    assert rt["final"]["utility_kept"] > 0.8  # ... while NPO+RT keeps its utility
    assert rt["final"]["model_utility"] > ga["final"]["model_utility"] + 0.3
    # plain NPO (no retain term) on a 4-person forget set collapses too, but never clearly faster than GA: its
    # gradient is GA's times 2π^β/(π^β + π_ref^β), 1 at the start, so early on the two differ only by
    # run-to-run numerics (measured up to 0.013 apart at one checkpoint, either way round)
    for a, b in zip(npo["curve"], ga["curve"]):
        assert a["step"] == b["step"] and a["model_utility"] >= b["model_utility"] - 0.05
    # forgetting happened: the forget answers became unlikely and forget quality rose from its start
    for r in (ga, npo, rt):
        assert r["curve"][-1]["forget/probability"] < 0.2 * r["curve"][0]["forget/probability"]
        assert max(p["forget_quality"] for p in r["curve"]) > 100 * r["curve"][0]["forget_quality"]


def test_report_regenerates(study, capsys):
    (study / "report.md").unlink()
    assert main(["report", str(study)]) == 0
    assert "forget quality" in (study / "report.md").read_text()
