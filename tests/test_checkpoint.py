"""halokit.checkpoint: exact resume, RNG, pruning, disk full, SIGKILL mid-write, the run lock, no pickle."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from halokit import checkpoint
from halokit.checkpoint import (
    cleanup_stale_tmp,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from halokit.errors import UserError

VOCAB = 16
SRC = Path(checkpoint.__file__).parents[1]


class Warmup:
    """A callable LambdaLR factor: its ``__dict__`` (not None) lands in the scheduler's state."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def _setup(seed: int):
    """Tied embedding/head (shared storage), dropout (uses the RNG), two param groups, one with amsgrad."""
    torch.manual_seed(seed)
    emb = nn.Embedding(VOCAB, 8)
    model = nn.Sequential(emb, nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, VOCAB, bias=False))
    model[4].weight = emb.weight
    optimizer = torch.optim.AdamW(
        [
            {"params": [emb.weight, model[1].weight], "weight_decay": 0.1},
            {"params": [model[1].bias], "weight_decay": 0.0, "amsgrad": True, "betas": (0.8, 0.95)},
        ],
        lr=1e-2,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 0.5 ** (s // 2), Warmup(5)])
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 6))  # (B, T), from the global RNG
        logits = model(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(1, dims=1).flatten())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _save(run_dir, step, model, optimizer, scheduler, **kwargs) -> Path:
    state = {"global_step": step, "epoch": 0, "batch_in_epoch": step, "metrics": {"loss": 1.25}, "span": (1, 2)}
    return save_checkpoint(run_dir, step, model_state=model.state_dict(), optimizer=optimizer,
                           scheduler=scheduler, trainer_state=state, **kwargs)


def _assert_same_optimizer_state(loaded: dict, saved: dict) -> None:
    assert loaded["state"].keys() == saved["state"].keys()
    for index, entry in saved["state"].items():
        assert loaded["state"][index].keys() == entry.keys()
        for name, value in entry.items():
            assert loaded["state"][index][name].dtype == value.dtype
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    assert loaded["param_groups"] == saved["param_groups"]
    for loaded_group, saved_group in zip(loaded["param_groups"], saved["param_groups"]):
        assert [type(v) for v in loaded_group.values()] == [type(v) for v in saved_group.values()]


def test_resume_continues_bit_identically(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, 3)
    path = _save(tmp_path, 3, model, optimizer, scheduler)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_lr = scheduler.get_last_lr()
    _train(model, optimizer, scheduler, 4)  # the uninterrupted run

    resumed, optimizer2, scheduler2 = _setup(seed=1)
    model_state, trainer_state = load_checkpoint(path, optimizer=optimizer2, scheduler=scheduler2)
    resumed.load_state_dict(model_state)

    _assert_same_optimizer_state(optimizer2.state_dict(), saved_optimizer)
    assert type(optimizer2.param_groups[1]["betas"]) is tuple
    assert optimizer2.param_groups[1]["amsgrad"] is True and optimizer2.param_groups[0]["amsgrad"] is False
    assert scheduler2.last_epoch == 3 and scheduler2.get_last_lr() == saved_lr
    assert scheduler2.lr_lambdas[1].steps == 5
    assert trainer_state == {"global_step": 3, "epoch": 0, "batch_in_epoch": 3, "metrics": {"loss": 1.25},
                             "span": (1, 2)}
    _train(resumed, optimizer2, scheduler2, 4)  # data and dropout come from the restored RNG
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert resumed[4].weight is resumed[0].weight


def test_optimizer_tensors_are_keyed_by_state_path(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, 1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    from safetensors import safe_open

    with safe_open(path / "optimizer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"state.0.exp_avg", "state.0.step", "state.2.max_exp_avg_sq"} <= keys
    assert not (path / "scheduler.safetensors").exists()  # a LambdaLR state is plain JSON


def test_restore_rng_replays_torch_python_and_numpy(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    first = torch.rand(3), random.random(), np.random.rand(2)
    assert restore_rng(path) is True
    again = torch.rand(3), random.random(), np.random.rand(2)
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])
    with pytest.warns(UserWarning, match="no RNG state for process 1"):
        assert restore_rng(path, process_index=1) is False


def test_cuda_rng_states_round_trip(tmp_path, monkeypatch):
    """CPU-only machine: fake two CUDA devices to check the list of their states is saved and set back."""
    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    model, optimizer, scheduler = _setup(seed=0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    restore_rng(path)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, devices))


def test_newer_format_is_refused(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    meta = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**meta, "format": checkpoint.FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match=f"{re.escape(str(path))} has format {checkpoint.FORMAT_VERSION + 1}"):
        load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)


def test_keep_prunes_and_latest_ignores_incomplete_and_tmp(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]

    (root / "step-000009").mkdir()  # no COMPLETE marker
    (root / ".tmp-step-000010-4242").mkdir()
    (root / ".tmp-step-000010-4242" / "COMPLETE").touch()
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    assert cleanup_stale_tmp(tmp_path) == [root / ".tmp-step-000010-4242"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004", "step-000009"]
    with pytest.raises(UserError, match="step-000009 is not a complete halokit checkpoint"):
        load_checkpoint(root / "step-000009", optimizer=optimizer, scheduler=scheduler)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_saving_a_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    _save(tmp_path, 5, model, optimizer, scheduler)
    _train(model, optimizer, scheduler, 1)
    path = _save(tmp_path, 5, model, optimizer, scheduler)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]
    model_state, _ = load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)
    assert torch.equal(model_state["1.bias"], model[1].bias)


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, 2)
    good = _save(tmp_path, 100, model, optimizer, scheduler)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, scheduler, 1)

    real_save_file = checkpoint.save_file

    def full_disk(tensors, filename):
        if filename.endswith("optimizer.safetensors"):  # model.safetensors is already written by then
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    message = (f"checkpoint at step 123 could not be written to {tmp_path / 'checkpoints'} "
               f"(No space left on device); the last good checkpoint is {good}")
    with pytest.raises(UserError, match=re.escape(message)):
        _save(tmp_path, 123, model, optimizer, scheduler)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000100"]

    _, optimizer2, scheduler2 = _setup(seed=1)
    model_state, trainer_state = load_checkpoint(good, optimizer=optimizer2, scheduler=scheduler2)
    assert model_state.keys() == saved_weights.keys()
    assert all(torch.equal(model_state[k], v) for k, v in saved_weights.items())
    _assert_same_optimizer_state(optimizer2.state_dict(), saved_optimizer)
    assert trainer_state["global_step"] == 100


def test_disk_full_on_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup(seed=0)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_bytes", full_disk)
    with pytest.raises(UserError, match=r"\(No space left on device\); there is no earlier checkpoint"):
        _save(tmp_path, 1, model, optimizer, scheduler)
    assert list((tmp_path / "checkpoints").iterdir()) == []


CRASH_SCRIPT = """
import os, signal, sys
import torch
from halokit import checkpoint as ck

run_dir, kill_at = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

def step():
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step(); scheduler.step(); optimizer.zero_grad()

def save(n):
    ck.save_checkpoint(run_dir, n, model_state=model.state_dict(), optimizer=optimizer,
                       scheduler=scheduler, trainer_state={"global_step": n})

step(); save(1)
torch.save = None  # no pickle on the way
real_write, real_publish = ck._write_bytes, ck._publish

def write_then_die(path, data):
    if path.name == kill_at:  # model and optimizer files are written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, data)

def die_before_rename(tmp, final):  # COMPLETE is in the temp dir, the rename never happens
    os.kill(os.getpid(), signal.SIGKILL)

ck._write_bytes = write_then_die
if kill_at == "rename":
    ck._publish = die_before_rename
step(); save(2)
"""


@pytest.mark.parametrize("kill_at", ["scheduler.json", "rename"])
def test_sigkill_mid_write_leaves_the_previous_checkpoint(tmp_path, kill_at):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, str(script), str(run_dir), kill_at], env=env, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr

    root = run_dir / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-000002-")]
    assert len(leftovers) == 1
    assert (root / leftovers[0] / "model.safetensors").exists()
    assert latest_checkpoint(run_dir) == root / "step-000001"

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model_state, trainer_state = load_checkpoint(root / "step-000001", optimizer=optimizer, scheduler=scheduler)
    model.load_state_dict(model_state)
    assert trainer_state == {"global_step": 1} and scheduler.last_epoch == 1
    assert optimizer.state_dict()["state"][0]["step"].item() == 1.0
    assert cleanup_stale_tmp(run_dir) == [root / leftovers[0]]
    assert [p.name for p in root.iterdir()] == ["step-000001"]


def test_state_that_json_cannot_hold_is_refused_before_writing(tmp_path):
    model, optimizer, _ = _setup(seed=0)
    holder = Warmup(5)
    holder.curve = len  # a function in a LambdaLR factor's __dict__ ends up in state_dict()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [holder, holder])
    with pytest.raises(TypeError, match=r"lr_lambdas\.0\.curve: a builtin_function_or_method cannot be stored"):
        _save(tmp_path, 1, model, optimizer, scheduler)
    with pytest.raises(TypeError, match=r"trainer_state\.loss: store a number, not a tensor"):
        save_checkpoint(tmp_path, 1, model_state={}, optimizer=optimizer, scheduler=_setup(0)[2],
                        trainer_state={"loss": torch.tensor(1.0)})
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_of_another_model_is_a_user_error(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, 1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    other = nn.Linear(2, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    other_scheduler = torch.optim.lr_scheduler.LambdaLR(other_optimizer, lambda s: 1.0)
    with pytest.raises(UserError, match=f"checkpoint {re.escape(str(path))} does not fit this optimizer"):
        load_checkpoint(path, optimizer=other_optimizer, scheduler=other_scheduler)
    (path / "optimizer.json").write_text("{not json")
    with pytest.raises(UserError, match=f"checkpoint {re.escape(str(path))} cannot be read"):
        load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)


def test_no_pickle_anywhere(tmp_path):
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, 1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    names = {p.name for p in path.iterdir()}
    assert all(n == "COMPLETE" or n.endswith((".safetensors", ".json")) for n in names), names
    assert {"model.safetensors", "optimizer.json", "scheduler.json", "rng-rank0.json", "trainer_state.json"} <= names
    meta = json.loads((path / "trainer_state.json").read_text())
    assert meta["format"] == checkpoint.FORMAT_VERSION and meta["halokit_version"]
    source = Path(checkpoint.__file__).read_text()
    for banned in ("pickle", "torch.load", "torch.save"):
        assert banned not in source


DISTRIBUTED_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from halokit.checkpoint import restore_rng, save_checkpoint

run_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
torch.manual_seed(100 + rank)
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
path = save_checkpoint(run_dir, 7, model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                       trainer_state={}, process_index=rank, num_processes=accelerator.num_processes,
                       barrier=accelerator.wait_for_everyone)
first = torch.rand(4)
restore_rng(path, rank)
again = torch.rand(4)
with open(f"{run_dir}/replay-{rank}.json", "w") as f:
    json.dump({"path": str(path), "replayed": torch.equal(first, again)}, f)
"""


@pytest.mark.slow
def test_two_processes_write_their_own_rng(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(DISTRIBUTED_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                          env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-000007"
    replays = [json.loads((tmp_path / f"replay-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["replayed"] and r["path"] == str(path) for r in replays)
    from safetensors.torch import load_file

    states = [load_file(str(path / f"rng-rank{rank}.safetensors"))["torch"] for rank in (0, 1)]
    assert not torch.equal(states[0], states[1])  # seeded 100 and 101
