"""Training progress: a bar on a terminal that keeps its count in view, plain lines in a log."""

import io
import re
from pathlib import Path

from rich.console import Console

from halokit.cli import main
from halokit.progress import TrainingProgress

ROOT = Path(__file__).parents[1]
INFO = "loss=0.7181 kl=0.0215 rewards/margins=-0.0214 rewards/chosen=-0.0480 rewards/rejected=-0.0266"


def test_training_into_a_log_prints_a_line_per_logged_step(tmp_path, capsys, monkeypatch):
    """Piped output (a batch job's log): rich would draw the bar once, at the end; each logged step is a line."""
    monkeypatch.chdir(ROOT)
    assert main(["train", "recipes/tiny-kto.yaml", "train.max_steps=4", "train.log_every=2",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kto step")]
    assert len(lines) == 2, lines
    for line, step, pct in zip(lines, (2, 4), (50, 100)):
        assert re.fullmatch(rf"kto step {step}/4 \({pct} %\) \d+:\d\d:\d\d elapsed, ETA \d+:\d\d:\d\d \| "
                            r"loss=\d\.\d{4} kl=\d\.\d{4} rewards/margins=-?\d\.\d{4} .*", line), line


def test_terminal_bar_cuts_the_metrics_not_the_count():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_interactive=True, width=80, color_system=None)
    with TrainingProgress(console, "kto", total=200, completed=0) as progress:
        progress.advance(40)
        progress.update(40, INFO)
    last = out.getvalue().replace("\r", "\n").splitlines()
    last = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in last]
    final = [line for line in last if "40/200" in line][-1]
    assert len(final) <= 80 and "loss=0.7181" in final and final.rstrip().endswith("…"), final
