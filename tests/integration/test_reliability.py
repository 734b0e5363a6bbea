"""Killed, full-disk, diverging and concurrent runs never lose work: `halokit train` end to end on tiny models.

The crash test runs one KTO recipe to completion (the reference) and another that is killed with SIGKILL
six times, at seeded random moments and at fixed points inside checkpoint writes, and resumed after
each kill. Runs are separate processes forked from a server that has imported torch and transformers
once (multiprocessing's forkserver), so each start costs a fork, not 4 s of imports. ``CHILD`` sends a
run's output to a log, patches the one function a kill should interrupt, and calls the CLI's ``main``.
"""

import errno
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import halokit.checkpoint
from halokit.checkpoint import COMPLETE, latest_checkpoint
from halokit.cli import main

ROOT = Path(__file__).parents[2]
KTO = str(ROOT / "recipes" / "tiny-kto.yaml")
MAX_STEPS = 12
CRASH_ARGS = [KTO, f"train.max_steps={MAX_STEPS}", "train.save_every=2", "train.keep_checkpoints=2",
              "train.micro_batch_size=4"]

CHILD = """
import os, shutil, signal, sys
import torch
from halokit import checkpoint, models
from halokit.cli import main

log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log, 1), os.dup2(log, 2)
sys.stdout.reconfigure(line_buffering=True), sys.stderr.reconfigure(line_buffering=True)
os.chdir(CWD)
torch.set_num_threads(1)  # a tiny model gains nothing from two threads, and on a busy machine they cost 3x

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if POINT == "optimizer.json":  # mid-write: model and optimizer tensors are in the temp dir, the rest is not
    write = checkpoint._write_bytes
    checkpoint._write_bytes = lambda path, data: die() if path.name == POINT else write(path, data)
elif POINT == "publish":  # COMPLETE is written in the temp dir; the rename never happens
    checkpoint._publish = die
elif POINT == "prune":  # a new checkpoint is published; the oldest is renamed aside but not yet deleted
    rmtree = shutil.rmtree
    shutil.rmtree = lambda path, *a, **k: die() if ".tmp-pruned-" in str(path) else rmtree(path, *a, **k)
elif POINT == "final model":  # the final checkpoint exists; the model is written but not moved into place
    models._replace_dir = die
sys.exit(main(ARGS))
"""
PRELOAD = ["halokit.cli", "halokit.train", "halokit.data.tokenizer", "transformers.models.llama.modeling_llama"]


class Run:
    """``halokit ARGS`` in its own process, its output in ``log``; killed at ``kill_at`` (see CHILD)."""

    def __init__(self, *args, kill_at=None):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # read when the server first starts
        self.args = [str(a) for a in args]
        self.log = Path(os.environ["HALOKIT_CACHE"]).parent / f"log-{time.monotonic_ns()}.txt"
        names = {"ARGS": self.args, "LOG": str(self.log), "CWD": str(ROOT), "POINT": kill_at}
        self.process = ctx.Process(target=exec, args=(CHILD, names), daemon=True)
        self.process.start()
        self.pid = self.process.pid

    def running(self) -> bool:
        return self.process.is_alive()

    def wait(self, timeout=300) -> int:
        self.process.join(timeout)
        assert self.process.exitcode is not None, f"still running after {timeout}s"
        return self.process.exitcode

    def kill(self) -> int:
        os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def metric_rows(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def kill_after_rows(run, run_dir, rows, delay):
    """SIGKILL ``run`` ``delay`` seconds after metrics.jsonl first holds ``rows`` rows (of this run: a
    resumed run first says so, then drops the rows after its checkpoint)."""
    deadline = time.time() + 120
    while ("--resume" in run.args and "resume" not in run.output()) or len(metric_rows(run_dir)) < rows:
        assert run.running() and time.time() < deadline, run.output()[-2000:]
        time.sleep(0.005)
    time.sleep(delay)
    return run.kill()


def assert_no_half_checkpoint_is_visible(run_dir):
    """Every directory named like a checkpoint is complete; unfinished ones exist only as .tmp-*."""
    root = Path(run_dir) / "checkpoints"
    for entry in root.iterdir() if root.exists() else []:
        assert entry.name.startswith(".tmp-") or (entry / COMPLETE).is_file(), entry


def test_sigkill_at_six_moments_then_resume_equals_uninterrupted(tmp_path):
    """Killed at 2 seeded random moments, in the middle of a checkpoint write, between COMPLETE and the
    rename, while pruning, and while writing the final model: each resume starts from the newest complete
    checkpoint, and the final weights and logged losses equal an uninterrupted run's (CPU, float32, 1e-6)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = Run("train", *CRASH_ARGS, f"output_dir={whole}")  # runs alongside the first kills
    rng = random.Random(8)
    kills = [kill_after_rows(Run("train", *CRASH_ARGS, f"output_dir={cut}"), cut, rows=rng.randint(1, 3),
                             delay=rng.uniform(0, 0.05))]
    for point in ("optimizer.json", "publish", "prune", "random", "final model", None):
        assert_no_half_checkpoint_is_visible(cut)
        resume_from = latest_checkpoint(cut)
        run = Run("train", "--resume", cut, kill_at=None if point == "random" else point)
        if point == "random":
            kills.append(kill_after_rows(run, cut, rows=resume_step(resume_from) + rng.randint(1, 2),
                                         delay=rng.uniform(0, 0.05)))
        else:
            kills.append(run.wait())
            assert left_by(point, cut), f"the kill at {point!r} did not happen where it should"
        out = run.output()
        assert "Traceback" not in out, out[-3000:]
        if resume_from is not None:  # the newest complete checkpoint, never a temp dir
            assert f"resumed from {resume_from} at step" in out, out[-3000:]
    assert kills == [-signal.SIGKILL] * 6 + [0]
    assert reference.wait() == 0, reference.output()[-3000:]

    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in metric_rows(cut)] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in metric_rows(cut)] == pytest.approx([r["loss"] for r in metric_rows(whole)], abs=1e-6)
    leftovers = [p.name for p in [*cut.iterdir(), *(cut / "checkpoints").iterdir()] if ".tmp-" in p.name or
                 ".old-" in p.name or p.name == ".lock"]
    assert leftovers == []


def left_by(point, run_dir) -> bool:
    """Whether ``run_dir`` shows the traces a kill at ``point`` leaves (the next run clears them)."""
    tmp = list((run_dir / "checkpoints").glob(".tmp-*"))
    return {
        "optimizer.json": any((p / "optimizer.safetensors").exists() and not (p / COMPLETE).exists() for p in tmp),
        "publish": any(p.name.startswith(".tmp-step-") and (p / COMPLETE).exists() for p in tmp),
        "prune": any(p.name.startswith(".tmp-pruned-") for p in tmp),
        "final model": any(run_dir.glob("model.tmp-*")) and not (run_dir / "model").exists(),
        None: (run_dir / "model").is_dir(),
    }[point]


def resume_step(checkpoint):
    return 0 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def test_a_metrics_line_torn_by_a_kill_does_not_stop_the_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert main(["train", KTO, "train.max_steps=2", "train.save_every=1", f"output_dir={run}"]) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.69')
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 0
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]


def test_a_second_run_on_a_busy_directory_refuses_before_writing_anything(tmp_path, capsys):
    run = tmp_path / "run"
    first = Run("train", KTO, "train.max_steps=100000", f"output_dir={run}")
    try:
        deadline = time.time() + 120
        while not (run / ".lock").exists() or not metric_rows(run):
            assert first.running() and time.time() < deadline, first.output()[-2000:]
            time.sleep(0.02)
        config = (run / "config.yaml").read_bytes()
        data = tmp_path / "with_a_bad_row.jsonl"  # would make the second run write bad_rows.jsonl
        data.write_text((ROOT / "recipes/data/feedback.jsonl").read_text() + "{broken\n")
        code = main(["train", KTO, "kto.beta=0.5", f"data.train={data}", "data.on_bad_row=skip",
                     f"output_dir={run}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"{run} is in use by another halokit run (pid {first.pid} on " in err
        assert (run / "config.yaml").read_bytes() == config and not (run / "bad_rows.jsonl").exists()
        assert first.running()  # the first run goes on
    finally:
        first.kill()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    """ENOSPC while step 2's optimizer state is written: exit 2 naming the step and the last good
    checkpoint, which still loads; once space is back, --resume ends where an uninterrupted run ends."""
    monkeypatch.chdir(ROOT)
    args = [KTO, "train.max_steps=3", "train.save_every=1", "train.micro_batch_size=4"]
    assert main(["train", *args, f"output_dir={tmp_path / 'whole'}"]) == 0
    save_file = halokit.checkpoint.save_file

    def full_disk(tensors, filename):
        if "step-000002" in filename and filename.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, filename)

    monkeypatch.setattr(halokit.checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *args, f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    good = run / "checkpoints" / "step-000001"
    assert err.count("\n") == 1 and "checkpoint at step 2 could not be written" in err
    assert f"(No space left on device); the last good checkpoint is {good}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert (good / COMPLETE).is_file() and not (run / "model").exists() and not (run / ".lock").exists()

    monkeypatch.setattr(halokit.checkpoint, "save_file", save_file)
    assert main(["train", "--resume", str(run)]) == 0
    assert f"resumed from {good}" in capsys.readouterr().out
    a, b = final_weights(tmp_path / "whole"), final_weights(run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_full_disk_while_writing_the_final_model_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", full_disk)
        assert main(["train", KTO, "train.max_steps=1", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"halokit train: error: {run / 'model'}: the model could not be written (No space left on "
                   f"device)\n")
    assert not (run / "model").exists() and [p.name for p in run.iterdir() if ".tmp-" in p.name] == []
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model" / "model.safetensors").is_file()


def test_weights_that_became_nan_are_never_written(tmp_path, monkeypatch, capsys):
    """The loss and gradient at step 1 are finite, but lr × weight decay overflows the update: the weights
    are Inf/NaN before any loss is. Regression: the run finished and saved an all-NaN final model."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "nan"
    code = main(["train", KTO, "train.max_steps=2", "train.lr=1e12", "train.weight_decay=1e30",
                 "train.max_grad_norm=0", "train.save_every=1", f"output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "training diverged: at step 1 the weights hold NaN or Inf" in err
    assert "this checkpoint was not written and there is no earlier checkpoint" in err
    assert not (run / "model").exists() and latest_checkpoint(run) is None


def test_divergence_names_the_step_and_a_finite_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """lr = 1e12: step 1 is finite, its update makes every later loss NaN; after 2 such steps in a row the
    run stops. The checkpoints it names hold finite weights; metrics log the step that was skipped."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "nan"
    code = main(["train", str(ROOT / "recipes/tiny-sft.yaml"), "train.max_steps=20", "train.lr=1e12",
                 "train.max_grad_norm=0", "train.max_nonfinite_steps=2", "train.save_every=1", f"output_dir={run}"])
    captured = capsys.readouterr()
    last = latest_checkpoint(run)
    assert code == 2
    assert captured.err.strip().endswith(f"up to step 3; the last good checkpoint is {last}; no final model was "
                                         f"written (lower train.lr?)")
    assert "step 2: non-finite loss or gradient; update skipped (1 in a row)" in captured.out
    assert last.name == "step-000002" and not (run / "model").exists()
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = {r["step"]: r["loss"] for r in metric_rows(run)}
    assert sorted(logged) == [1, 2] and logged[1] == logged[1] and logged[2] != logged[2]  # step 2: NaN
