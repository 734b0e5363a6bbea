"""bf16 weights over float32 masters: the bookkeeping is exact, training tracks autocast training, the
saved model and checkpoints hold the float32 masters, and resume continues bit for bit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halokit.cli import main
from halokit.models import build_tiny_model
from halokit.precision import MasterWeights

ROOT = Path(__file__).parents[1]


def model():
    return build_tiny_model({"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48}, vocab_size=40)


def loss_of(m, ids):
    return m(input_ids=ids).logits.float().logsumexp(-1).mean()


def test_model_computes_in_bf16_and_masters_keep_float32():
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    master = MasterWeights(m)
    for (n, p), w in zip(m.named_parameters(), master.params):
        assert p.dtype == torch.bfloat16 and w.dtype == torch.float32
        assert torch.equal(w, before[n]) and torch.equal(p, before[n].bfloat16())
    assert master.values.numel() == sum(p.numel() for p in before.values())


def test_gradients_accumulate_in_float32_and_bf16_grads_are_freed():
    m = model()
    master = MasterWeights(m)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = []
    for k in range(2):  # the bf16 gradient of each backward, computed separately
        twin = model()
        for p in twin.parameters():  # parameters only: the rotary buffer stays float32, as in m
            p.data = p.data.bfloat16()
        (loss_of(twin, ids[k:k + 1]) * (k + 1)).backward()
        expected.append([p.grad.float() for p in twin.parameters()])
    for k in range(2):
        (loss_of(m, ids[k:k + 1]) * (k + 1)).backward()
    assert all(p.grad is None for p in m.parameters())  # collected and freed by the hooks
    for w, g0, g1 in zip(master.params, *expected):
        torch.testing.assert_close(w.grad, g0 + g1, rtol=0, atol=0)


def test_step_publish_and_state():
    m = model()
    master = MasterWeights(m)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    loss_of(m, ids).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in master.params)
    opt = torch.optim.AdamW(master.params, lr=1e-3)
    opt.step()
    master.publish()
    for p, w in zip(m.parameters(), master.params):
        assert torch.equal(p.detach(), w.detach().bfloat16())
    state = master.state_dict()
    assert all(v.untyped_storage().data_ptr() != master.values.untyped_storage().data_ptr() for v in state.values())
    fresh = MasterWeights(model())
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, master.params))
    master.restore()
    for p, w in zip(m.parameters(), master.params):
        assert p.dtype == torch.float32 and torch.equal(p, w)


def test_bf16_weights_training_tracks_autocast_and_saves_float32(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        assert main(["train", "recipes/tiny-kto.yaml", "train.max_steps=6", "model.dtype=bfloat16",
                     f"model.bf16_weights={flag}", f"output_dir={run}"]) == 0
        runs[flag] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert runs["true"][0]["kl"] == 0.0  # the reference saw the same bf16 weights as step 1
    losses = [[r["loss"] for r in runs[f]] for f in ("true", "false")]
    assert losses[0] == pytest.approx(losses[1], rel=0.03)
    saved = load_file(str(tmp_path / "true" / "model" / "model.safetensors"))
    autocast = load_file(str(tmp_path / "false" / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    moved = [float((saved[k] - autocast[k]).norm() / autocast[k].norm()) for k in saved]
    assert max(moved) < 0.02
    # the masters kept updates a bf16 weight alone would round away
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())


def test_resume_in_bf16_weights_mode_equals_uninterrupted(tmp_path, monkeypatch):
    """Resume from the step-2 checkpoint of a finished 4-step run (its later checkpoint and model removed): the
    masters and optimizer state come back exactly, so the final model is bit-identical."""
    monkeypatch.chdir(ROOT)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "recipes/tiny-kto.yaml", "model.dtype=bfloat16", "train.max_steps=4", "train.save_every=2",
                 f"output_dir={whole}"]) == 0
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "model")
    assert main(["train", "--resume", str(cut)]) == 0
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cpu_bf16_detection_reads_the_flags():
    """bf16 instructions from /proc/cpuinfo's flags (x86) or Features (Arm); unknown without either."""
    from halokit.precision import cpu_has_bf16

    assert cpu_has_bf16("processor : 0\nflags : fpu sse avx2 fma\n") is False
    assert cpu_has_bf16("flags : avx2 avx512f avx512_bf16\n") is True
    assert cpu_has_bf16("flags : avx2 amx_tile amx_bf16\n") is True
    assert cpu_has_bf16("Features : fp asimd bf16 i8mm\n") is True
    assert cpu_has_bf16("model name : something\n") is None


def test_dtype_note_warns_only_for_emulated_bf16(monkeypatch):
    from halokit import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert "float32" in precision.dtype_note("bfloat16", "cpu")
    assert precision.dtype_note("float32", "cpu") is None
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.dtype_note("bfloat16", "cpu") is None
