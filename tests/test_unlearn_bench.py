"""The unlearning study's bookkeeping: evaluation schedule, best useful step, summaries, the eval-file reader."""

import json

import pytest

from halokit.cli import main
from halokit.errors import DataError
from halokit.unlearn_bench import UnlearnSettings, best_step, summarize, summarize_seeds, with_overrides
from halokit.unlearn_metrics import read_eval_file


def point(step, fq, mu):
    return {"step": step, "forget_quality": fq, "model_utility": mu, "weight_distance": float(step)}


def test_best_step_ignores_collapsed_points():
    curve = [point(0, 1e-9, 0.5), point(10, 1e-3, 0.45), point(20, 0.2, 0.41), point(30, 0.6, 0.05)]
    # 0.6 at step 30 is a collapse (10 % of the starting utility); 0.41 >= 0.8 * 0.5 keeps step 20
    assert best_step(curve)["step"] == 20
    assert best_step(curve, keep=0.95) is None or best_step(curve, keep=0.95)["step"] == 0


def test_summarize_final_and_best():
    runs = {"forget10-ga": {"method": "ga", "split": 10, "steps": 30,
                            "curve": [point(0, 1e-9, 0.5), point(15, 0.01, 0.45), point(30, 0.6, 0.05)]}}
    out = summarize(runs, UnlearnSettings())
    r = out["runs"]["forget10-ga"]
    assert r["utility_start"] == 0.5
    assert r["final"] == {"step": 30, "forget_quality": 0.6, "model_utility": 0.05, "utility_kept": pytest.approx(0.1)}
    assert r["best"]["step"] == 15 and r["best"]["utility_kept"] == pytest.approx(0.9)
    assert out["benchmark"] == "unlearning"


def test_summarize_seeds_median_and_range():
    def result(fq):
        return {"runs": {"forget10-npo": {"final": {"forget_quality": fq, "utility_kept": 0.9},
                                          "best": None if fq < 0.01 else {"forget_quality": fq}}}}
    s = summarize_seeds({0: result(0.1), 1: result(0.3), 2: result(0.001)})
    row = s["runs"]["forget10-npo"]
    assert row["final_forget_quality"] == {"median": 0.1, "min": 0.001, "max": 0.3}
    assert row["best_forget_quality"] == {"median": 0.2, "min": 0.1, "max": 0.3}
    assert row["useful_seeds"] == 2


def test_overrides_validate():
    s = with_overrides(UnlearnSettings(), splits=[10], methods=["npo_rt", "ga"], seed=3)
    assert (s.splits, s.methods, s.seed) == ((10,), ("npo_rt", "ga"), 3)
    assert UnlearnSettings().retain_weight_for(50) == 5.0 and UnlearnSettings().retain_weight_for(10) == 1.0


def test_eval_file_errors_name_line_and_field(tmp_path):
    good = {"question": "Q?", "answer": "A.", "paraphrased": "P.", "perturbed": ["x", "y"], "set": "forget"}
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "perturbed": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl, line 2, field 'perturbed': 1 answers, but earlier rows"):
        read_eval_file(str(path))
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "answer": ""}) + "\n")
    with pytest.raises(DataError, match=r"line 3, field 'answer'"):
        read_eval_file(str(path))
    path.write_text(json.dumps(good) + "\n")
    items = read_eval_file(str(path))
    assert len(items) == 1 and items[0].perturbed == ("x", "y") and items[0].set == "forget"


def test_eval_unlearning_cli_bad_file_exits_2(tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": 1}\n')
    assert main(["eval", "--model", str(tmp_path), "--unlearning", str(path)]) == 2
    err = capsys.readouterr().err
    assert "eval.jsonl, line 1, field 'question'" in err and err.count("\n") == 1
