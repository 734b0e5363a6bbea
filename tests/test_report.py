"""report: bootstrap CI, plots, report.md/report.html for demo and plain run directories, console table."""

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from halokit.errors import UserError
from halokit.report import (
    bootstrap_ci,
    plot_training_curves,
    print_results,
    read_metrics,
    result_rows,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, n_steps=6, *, kl=True, eval_every=0):
    """A small metrics.jsonl; ``kl=False`` writes SFT-like rows (loss and logps/chosen only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, n_steps + 1):
        row = {"step": step, "epoch": step / n_steps, "loss": 0.7 - 0.05 * step, "logps/chosen": -70.0 + step,
               "grad_norm": 0.5, "lr": 1e-4, "tokens_per_s": 4000.0}
        if kl:
            row.update({"kl": 0.1 * step, "rewards/chosen": 0.02 * step, "rewards/rejected": -0.01 * step,
                        "rewards/margins": 0.03 * step, "logps/rejected": -71.0 - step})
        rows.append(row)
        if eval_every and step % eval_every == 0:
            rows.append({"step": step, "eval/loss": 0.72 - 0.04 * step, "eval/kl": None})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _metrics(greedy, ci, sampled, judge, kl, length, cats):
    return {"desirable_greedy": {"mean": greedy, "ci": ci}, "desirable_sampled": {"mean": sampled, "ci": None},
            "judge_score": judge, "kl_to_sft": kl, "mean_length": length, "n_prompts": 300,
            "per_category": cats, "greedy_desirable": [1, 0],
            "sampled_desirable": [1] * round(100 * sampled) + [0] * round(100 * (1 - sampled))}


@pytest.fixture
def demo_dir(tmp_path):
    """A demo directory: sft + balanced/{kto,dpo} + scarce/kto with metrics; scarce/dpo has no run dir."""
    _write_metrics(tmp_path / "sft", kl=False)
    for name in ("balanced-kto", "balanced-dpo", "scarce-kto"):
        _write_metrics(tmp_path / name)
    cats = {"arithmetic": 0.6, "list": 0.3, "decline": 0.7}
    results = {
        "task": "demo", "seed": 0, "quick": True, "extra_key_from_the_future": [1, 2],
        "settings": {"kto": {"beta": 0.5, "lr": 2e-4}, "noise": 0.2},
        "notes": ["λ_D from the paper's rule", "DPO <script>alert(1)</script> & collapsed"],
        "models": {
            "sft": {"run_dir": "sft", "scenario": None, "method": "sft",
                    "metrics": _metrics(0.40, [0.35, 0.45], 0.33, 0.41, 0.0, 12.3, cats)},
            "balanced/kto": {"run_dir": "balanced-kto", "scenario": "balanced", "method": "kto",
                             "metrics": _metrics(0.52, [0.47, 0.57], 0.41, 0.55, 0.123, 11.0, cats)},
            "balanced/dpo": {"run_dir": "balanced-dpo", "scenario": "balanced", "method": "dpo",
                             "metrics": _metrics(0.31, [0.26, 0.36], 0.2, 0.3, None, 30.25, cats)},
            "scarce/kto": {"run_dir": "scarce-kto", "scenario": "scarce", "method": "kto",
                           "metrics": _metrics(0.655, [0.6, 0.71], 0.5, 0.6, 0.2, 10.0, {"arithmetic": 0.9})},
            "scarce/dpo": {"run_dir": "scarce-dpo", "scenario": "scarce", "method": "dpo",
                           "metrics": _metrics(0.45, [0.4, 0.5], 0.4, 0.45, 0.3, 9.0, cats)},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_all_ones_is_degenerate():
    assert bootstrap_ci([1] * 50) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_half_half():
    """Mean 0.5; with n=100 prompts the 95% CI is about 0.5 ± 1.96·sqrt(0.25/100) = [0.40, 0.60]."""
    mean, low, high = bootstrap_ci([0, 1] * 50)
    assert mean == 0.5
    assert 0.3 <= low < 0.5 < high <= 0.7
    assert high - low == pytest.approx(0.196, abs=0.03)


def test_bootstrap_ci_is_deterministic_per_seed():
    values = [0, 1, 1, 0, 1, 0.5, 0.25, 1, 0, 1]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    narrow = bootstrap_ci(values, level=0.5)
    wide = bootstrap_ci(values, level=0.99)
    assert wide[1] <= narrow[1] and narrow[2] <= wide[2]


def test_bootstrap_ci_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


# ---------------------------------------------------------------- demo report


def test_result_rows_format_and_delta_vs_sft(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    rows = {r[0]: r for r in result_rows(results)}
    kto = rows["balanced/kto"]
    assert kto[:2] == ["balanced/kto", "52.0 [47.0, 57.0]"]
    assert kto[3:] == ["0.550", "0.123", "11.0", "+12.0", "300"]
    # sampled has no stored CI: it is bootstrapped from sampled_desirable (41 ones, 59 zeros)
    mean, low, high = bootstrap_ci([1] * 41 + [0] * 59)
    assert kto[2] == f"41.0 [{100 * low:.1f}, {100 * high:.1f}]"
    assert 30 < 100 * low < 41 < 100 * high < 52
    assert rows["balanced/dpo"][4] == "—"  # kl_to_sft null
    assert rows["balanced/dpo"][6] == "-9.0"
    assert rows["scarce/kto"][6] == "+25.5"
    assert rows["sft"][1] == "40.0 [35.0, 45.0]" and rows["sft"][6] == "—"


def test_write_report_on_a_demo_dir(demo_dir):
    written = write_report(demo_dir)
    assert set(written) == {"report.md", "report.html", "desirable_rates.png", "curves_sft.png",
                            "curves_balanced.png", "curves_scarce.png"}
    for name, path in written.items():
        assert path == demo_dir / name and path.is_file()
        if name.endswith(".png"):
            _assert_png(path)
    md = written["report.md"].read_text()
    assert "| balanced/kto | 52.0 [47.0, 57.0] |" in md
    assert "| 0.550 | 0.123 | 11.0 | +12.0 | 300 |" in md
    assert "| scarce/kto | 90.0 | — | — |" in md  # per-category: missing categories shown as —
    assert "| kto.beta | 0.5 |" in md and "| noise | 0.2 |" in md
    assert "- λ_D from the paper's rule" in md
    assert "![desirable rate per scenario and method](desirable_rates.png)" in md
    assert "scarce/dpo" in md.split("## Training curves")[1]  # reported as having no metrics.jsonl
    html = written["report.html"].read_text()
    assert "<script>" not in html
    assert "DPO &lt;script&gt;alert(1)&lt;/script&gt; &amp; collapsed" in html
    assert html.count("data:image/png;base64,") == 4
    assert "<td>52.0 [47.0, 57.0]</td>" in html


def test_print_results_to_console(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    console = Console(file=io.StringIO(), width=200)
    print_results(results, console)
    out = console.file.getvalue()
    assert "balanced/kto" in out and "52.0 [47.0, 57.0]" in out and "+12.0" in out


def test_demo_without_sft_run_dir_skips_its_curves(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    results["models"]["sft"]["run_dir"] = None  # sft reused from elsewhere
    (demo_dir / "results.json").write_text(json.dumps(results))
    written = write_report(demo_dir)
    assert "curves_sft.png" not in written and "curves_balanced.png" in written


def test_training_curves_omit_keys_a_run_lacks(demo_dir, tmp_path):
    drawn = plot_training_curves({"sft": demo_dir / "sft", "kto": demo_dir / "balanced-kto"}, tmp_path / "c.png")
    assert drawn == {"loss": ["sft", "kto"], "kl": ["kto"], "rewards/margins": ["kto"]}
    assert plot_training_curves({"sft": demo_dir / "sft"}, tmp_path / "s.png") == {"loss": ["sft"]}
    _assert_png(tmp_path / "s.png")


# ---------------------------------------------------------------- plain run


def test_write_report_on_a_plain_run_dir(tmp_path):
    _write_metrics(tmp_path, eval_every=3)
    (tmp_path / "config.yaml").write_text("method: kto\nmethod_settings:\n  beta: 0.1  # <b>\n")
    written = write_report(tmp_path)
    assert set(written) == {"report.md", "report.html", "curves.png"}
    _assert_png(written["curves.png"])
    md = written["report.md"].read_text()
    assert "| metric | train (step 6) | eval (step 6) |" in md
    assert "| loss | 0.4 | 0.48 |" in md  # train 0.7 - 0.3, eval 0.72 - 0.24
    assert "| kl | 0.6 | — |" in md  # eval/kl logged as null
    assert "method: kto" in md
    assert "beta: 0.1  # &lt;b&gt;" in written["report.html"].read_text()


def test_plain_run_curves_draw_eval_rows(tmp_path):
    _write_metrics(tmp_path, eval_every=2)
    drawn = plot_training_curves({"run": tmp_path}, tmp_path / "c.png", keys=("loss", "kl", "forget_loss"))
    assert drawn == {"loss": ["run"], "kl": ["run"]}


def test_missing_or_empty_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"metrics\.jsonl: no such file"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl: no metrics rows"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)


def test_no_pyplot_and_no_backend_switch(tmp_path):
    """Importing and using report leaves matplotlib's global state alone (no pyplot, backend untouched)."""
    _write_metrics(tmp_path)
    backend = "dict.__getitem__(matplotlib.rcParams, 'backend')"  # rcParams['backend'] would import pyplot
    code = (f"import sys, matplotlib; before = {backend}; from halokit.report import write_report; "
            f"write_report({str(tmp_path)!r}); assert 'matplotlib.pyplot' not in sys.modules; "
            f"assert {backend} == before")
    subprocess.run([sys.executable, "-c", code], check=True)
