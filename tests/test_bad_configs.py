"""Bad configs and a hostile environment give one line and exit code 2 through `halokit train`, never a traceback.

Config values are checked before anything is written; paths (model, output, cache) are checked before the
model is loaded or a step runs. Full disks during checkpoints and the final save are in
tests/integration/test_reliability.py.
"""

import errno
import os
from pathlib import Path

import pytest

import halokit.cli
import halokit.run
from halokit.cli import main

ROOT = Path(__file__).parents[1]


def recipe(method):
    return str(ROOT / "recipes" / f"tiny-{method}.yaml")


def train(capsys, method, run_dir, *overrides):
    code = main(["train", recipe(method), "train.max_steps=1", f"output_dir={run_dir}", *map(str, overrides)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("method, overrides, message", [
    ("kto", ["train.lrr=1e-5"], "train.lrr: unknown key; did you mean 'train.lr'?"),
    ("kto", ["trian.lr=1e-5"], "trian: unknown key; did you mean 'train'?"),
    ("kto", ["kto.betta=0.1"], "kto.betta: unknown key; did you mean 'kto.beta'?"),
    ("kto", ["kto.beta=0"], "kto.beta: expected a positive float, got 0"),
    ("dpo", ["dpo.beta=-0.1"], "dpo.beta: expected a positive float, got -0.1"),
    ("kto", ["kto.beta=.inf"], "kto.beta: expected a positive float, got Infinity"),
    ("kto", ["train.lr=0"], "train.lr: expected a positive float, got 0"),
    ("kto", ["train.lr=-1e-5"], 'train.lr: expected a positive float, got "-1e-5"'),
    # regression: accepted, then AdamW's float32 step overflowed with a RuntimeError traceback
    ("kto", ["train.lr=1.0e+39"], "train.lr: expected a positive float below 1e30, got 1e+39"),
    ("kto", ["train.lr=.nan"], "train.lr: expected a positive float, got NaN"),
    # regression: math.ceil(inf) raised OverflowError
    ("kto", ["train.epochs=.inf", "train.max_steps=0"], "train.epochs: expected a positive float, got Infinity"),
    # regression: torch.manual_seed raised "Overflow when unpacking long long"
    ("kto", ["train.seed=4294967296"], "train.seed: expected an integer in [0, 2**32), got 4294967296"),
    ("kto", ["train.seed=-1"], "train.seed: expected an integer in [0, 2**32), got -1"),
    ("kto", ["train.micro_batch_size=1"], "train.micro_batch_size: kto pairs each prompt with another example's "
                                          "completion inside a micro-batch, so it needs at least 2, got 1"),
    ("kto", ["data.train=null"], "data.train: kto needs training data; set data.train to a file"),
    ("npo", ["data.forget=null"], "data.forget: npo unlearns a forget set; set data.forget to a file"),
    ("npo_rt", ["data.retain=null"], "data.retain: npo_rt regularises on a retain set; set data.retain to a file"),
    ("kto", ["data.max_prompt_length=128"], "data.max_prompt_length: expected less than data.max_length (128), "
                                            "got 128"),
    ("kto", ["model.path=some/model"], "model: set exactly one of model.path (a model to load) or model.tiny"),
    ("kto", ["method=ppo"], 'method: expected one of'),
])
def test_bad_values_are_refused_before_anything_is_written(method, overrides, message, tmp_path, capsys):
    code, err = train(capsys, method, tmp_path / "run", *overrides)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"halokit train: error: {message}"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model.tiny=null", "model.path={tmp}/no-model"], "{tmp}/no-model: model path not found"),
    (["model.tiny=null", "model.path={tmp}"], "{tmp}: no *.safetensors weights in this directory"),
    (["model.tokenizer={tmp}/no-tokenizer"], "{tmp}/no-tokenizer: tokenizer path not found"),
])
def test_missing_model_or_tokenizer_paths_name_the_path(overrides, message, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = train(capsys, "kto", run, *[o.format(tmp=tmp_path) for o in overrides])
    assert code == 2 and err == f"halokit train: error: {message.format(tmp=tmp_path)}\n"
    assert not (run / "model").exists() and not (run / "checkpoints").exists() and not (run / ".lock").exists()


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path, capsys, monkeypatch):
    """Tests run as root, whom chmod does not stop: a path under a regular file cannot be created by anyone."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = train(capsys, "kto", blocker / "run")
    assert code == 2
    assert err == f"halokit train: error: output_dir {blocker / 'run'}: cannot create it (Not a directory)\n"
    code, err = train(capsys, "kto", blocker)
    assert code == 2 and err == f"halokit train: error: output_dir {blocker}: cannot create it (File exists)\n"
    monkeypatch.setattr(halokit.run.os, "access", lambda path, mode: False)
    code, err = train(capsys, "kto", tmp_path / "read-only")
    assert code == 2 and err == f"halokit train: error: output_dir {tmp_path / 'read-only'}: not writable\n"


def test_a_cache_dir_that_cannot_be_created_is_named_before_training(tmp_path, capsys):
    """Regression: the reference cache's mkdir raised NotADirectoryError after the model had been loaded."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = train(capsys, "kto", tmp_path / "run", f"train.cache_dir={blocker / 'cache'}")
    assert code == 2
    assert err == f"halokit train: error: train.cache_dir {blocker / 'cache'}: cannot create it (Not a directory)\n"


def test_a_full_disk_anywhere_is_one_line_but_other_os_errors_are_not_hidden(monkeypatch, capsys):
    def fail(number):
        def handler(args):
            raise OSError(number, os.strerror(number), "/x/out.jsonl")
        return handler

    monkeypatch.setattr(halokit.cli, "cmd_data_validate", fail(errno.ENOSPC))
    assert main(["data", "validate", "any.jsonl"]) == 2
    assert capsys.readouterr().err == ("halokit data validate: error: /x/out.jsonl: No space left on device; free "
                                       "some space and run again\n")
    monkeypatch.setattr(halokit.cli, "cmd_data_validate", fail(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):  # a real bug or a broken disk keeps its traceback
        main(["data", "validate", "any.jsonl"])
