"""`halokit train` end to end on tiny models: every method, invariances, references, resume, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halokit.cli import main
from halokit.config import load_config
from halokit.methods import Method
from halokit.models import load_policy

ROOT = Path(__file__).parents[2]


def recipe(method):
    return str(ROOT / "recipes" / f"tiny-{method}.yaml")


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def initial_weights(method, *overrides):
    cfg = load_config(recipe(method), list(overrides))
    model, _ = load_policy(cfg.model, seed=cfg.train.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_every_method_trains_from_its_recipe(method, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / method
    assert main(["train", recipe(method), "train.max_steps=3", f"output_dir={run}"]) == 0
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    after, before = final_weights(run), initial_weights(method)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed, "no parameter moved"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    if Method(method).needs_kl_pairs:
        assert log[0]["kl"] == 0.0  # policy == reference at the first step
    if Method(method).needs_reference and Method(method).family == "paired":
        assert abs(log[0]["rewards/margins"]) < 1e-6


@pytest.mark.parametrize("method", ["kto", "dpo", "npo"])
def test_grad_accumulation_invariance(method, tmp_path, monkeypatch):
    """One optimizer step over the same 8 examples: micro-batch 4 × accumulation 2 == 8 × 1.

    KTO's KL pairs are formed per micro-batch, so its reference point z₀ differs between the two in
    general; at the first step the policy equals the reference and z₀ = 0 in both, so the update must match.
    AdamW's first update is lr·g/(|g| + ε) per element: where |g| is near ε (1e-8) the float32 rounding of
    the gradient, which differs between the two layouts, moves it by a fraction of lr. So at most 0.1 % of a
    tensor's elements (and at least one) may differ by more than 1e-5 and never by more than 2·lr; a wrong
    accumulation changes the direction of most updates.
    """
    monkeypatch.chdir(ROOT)
    common = ["train.max_steps=1", "train.warmup_ratio=0", "train.max_grad_norm=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", recipe(method), *common, "train.micro_batch_size=8", "train.grad_accum=1",
                 f"output_dir={a}"]) == 0
    assert main(["train", recipe(method), *common, "train.micro_batch_size=4", "train.grad_accum=2",
                 f"output_dir={b}"]) == 0
    wa, wb = final_weights(a), final_weights(b)
    lr = load_config(recipe(method), []).train.lr
    for k in wa:
        diff = (wa[k] - wb[k]).abs()
        off = diff > 1e-5 + 1e-5 * wb[k].abs()
        assert int(off.sum()) <= max(1, wa[k].numel() // 1000), (k, int(off.sum()), float(diff.max()))
        assert float(diff.max()) <= 2 * lr, k
    assert rows(a)[0]["loss"] == pytest.approx(rows(b)[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_cache_equals_live_references(method, tmp_path, monkeypatch, capsys):
    """The cached reference gives the same losses as a frozen copy and as LoRA-adapters-off (1e-6)."""
    monkeypatch.chdir(ROOT)
    losses = {}
    for kind in ("cache", "frozen", "adapters_off"):
        run = tmp_path / kind
        assert main(["train", recipe(method), "train.max_steps=3", "model.lora.r=4", f"train.reference={kind}",
                     f"output_dir={run}"]) == 0
        losses[kind] = [r["loss"] for r in rows(run)]
    for kind in ("frozen", "adapters_off"):
        assert losses[kind] == pytest.approx(losses["cache"], rel=1e-6, abs=1e-7)
    capsys.readouterr()
    assert main(["train", recipe(method), "train.max_steps=1", "model.lora.r=4", f"output_dir={tmp_path / 'again'}"]) == 0
    assert "reusing cached log-probs" in capsys.readouterr().out


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    """Kill a KTO run (SIGKILL) after its second checkpoint, resume it: the final weights equal an
    uninterrupted run's (CPU, float32)."""
    args = [recipe("kto"), "train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "halokit", "train", *args, f"output_dir={whole}"], check=True, cwd=ROOT,
                   env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "halokit", "train", *args, f"output_dir={cut}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-000004" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists()
    done = subprocess.run([sys.executable, "-m", "halokit", "train", "--resume", str(cut)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    a, b = final_weights(whole), final_weights(cut)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in rows(cut)] == list(range(1, 9))
    assert [r["loss"] for r in rows(cut)] == pytest.approx([r["loss"] for r in rows(whole)], abs=1e-6)


def test_divergence_stops_without_writing_nan_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "nan"
    code = main(["train", recipe("sft"), "train.max_steps=20", "train.lr=1e12", "train.max_grad_norm=0",
                 "train.max_nonfinite_steps=2", "train.save_every=1", f"output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and "the last good checkpoint is" in err
    assert not (run / "model").exists()


def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP) × micro-batch 4 takes the same first step as 1 process × 8:
    the gradients are averaged across ranks and KTO's z₀ (0 at the first step) is reduced across them."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    common = [recipe("kto"), "train.max_steps=1", "train.warmup_ratio=0"]
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "halokit", "train", *common,
                          "train.micro_batch_size=4", f"output_dir={tmp_path / 'two'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "halokit", "train", *common, "train.micro_batch_size=8",
                          f"output_dir={tmp_path / 'one'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert rows(tmp_path / "two")[0]["loss"] == pytest.approx(rows(tmp_path / "one")[0]["loss"], rel=1e-6)


def test_eval_split_and_bf16(tmp_path, monkeypatch):
    """A held-out share of the data is evaluated every N steps; bf16 autocast trains with finite metrics."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "ev"
    assert main(["train", recipe("dpo"), "train.max_steps=4", "data.eval_fraction=0.25", "train.eval_every=2",
                 "model.dtype=bfloat16", f"output_dir={run}"]) == 0
    log = rows(run)
    evals = [r for r in log if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["eval/loss"])) for r in evals)
    assert {"rewards/margins", "rewards/accuracies", "grad_norm", "lr", "tokens_per_s"} <= set(log[0])
