"""The halokit command: help and version, exit code 2 with one-line messages, data subcommands end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from halokit import __version__
from halokit.cli import main

ROOT = Path(__file__).parents[1]
COMMANDS = ["train", "demo", "eval", "data", "report", "unlearn"]


def run_cli(*args, cwd=None):
    """The installed entry point in a subprocess: exit code, stdout, stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "halokit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def feedback_file(path, n=10, broken_line=None):
    lines = [json.dumps({"id": i, "prompt": f"q{i % 5}", "completion": f"a{i}", "label": i % 3 != 0})
             for i in range(n)]
    if broken_line:
        lines[broken_line - 1] = '{"id": 6, "prompt": "q", "completion": "a", "label": tru'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"halokit {__version__}"
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: halokit {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["unlearn", "bench", "--splits", "0,10"], "--splits: percentages must be in (0, 100), got [0]"),
    (["unlearn", "bench", "--splits", "ten"], "--splits: expected comma-separated integers, got 'ten'"),
    (["unlearn", "bench", "--methods", "npo,gaa"], "--methods: unknown ['gaa']"),
    (["eval", "--model", "nowhere"], "give either --task demo, --prompts FILE"),
])
def test_bad_study_arguments_exit_2_in_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "unlearn" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written before the arguments are checked


def test_data_commands_and_config_errors_do_not_import_torch(tmp_path):
    """`halokit data ...` and a config error answer at once: neither imports torch (~3 s of a 3.5 s command on
    a slow machine), so the method table names its loss functions instead of importing them."""
    data = feedback_file(tmp_path / "fb.jsonl")
    script = (
        "import sys\nfrom halokit.cli import main\n"
        f"codes = [main(['data', 'validate', {str(data)!r}]), main(['data', 'inspect', {str(data)!r}]),\n"
        f"         main(['train', {str(tmp_path / 'missing.yaml')!r}])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "[0, 0, 2] False", proc.stdout + proc.stderr


def test_broken_line_7_exits_2_naming_the_line(tmp_path):
    data = feedback_file(tmp_path / "fb.jsonl", broken_line=7)
    code, out, err = run_cli("data", "validate", data)
    assert code == 2
    assert f"{data}, line 7: invalid JSON" in err and "Traceback" not in err


def test_skip_writes_bad_rows(tmp_path):
    data = feedback_file(tmp_path / "fb.jsonl", broken_line=7)
    code, out, err = run_cli("data", "validate", data, "data.on_bad_row=skip", "--bad-rows", tmp_path / "bad.jsonl")
    assert code == 0, err
    assert "9 valid feedback rows; 1 bad row skipped" in out
    (bad,) = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert bad["line"] == 7 and bad["reason"].startswith("invalid JSON")


def test_user_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    code, _, err = run_cli("train", tmp_path / "missing.yaml")
    assert code == 2 and err.strip().count("\n") == 0 and "config file not found" in err
    code, _, err = run_cli("--debug", "train", tmp_path / "missing.yaml")
    assert code != 0 and "Traceback" in err


def test_train_bad_override_names_key(capsys):
    assert main(["train", str(ROOT / "recipes/tiny-kto.yaml"), "train.lr=fast"]) == 2
    assert capsys.readouterr().err.strip() == 'halokit train: error: train.lr: expected a positive float, got "fast"'


def test_train_skips_bad_rows_into_run_dir(tmp_path, capsys):
    data = feedback_file(tmp_path / "fb.jsonl", n=12, broken_line=7)
    run_dir = tmp_path / "run"
    args = ["train", str(ROOT / "recipes/tiny-kto.yaml"), f"data.train={data}", f"output_dir={run_dir}",
            "train.max_steps=1", "train.micro_batch_size=4"]
    assert main(args) == 2
    assert "line 7" in capsys.readouterr().err
    assert main(args + ["data.on_bad_row=skip"]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "config.yaml").is_file() and "train: 11 examples" in out
    assert json.loads((run_dir / "bad_rows.jsonl").read_text())["line"] == 7
    assert (run_dir / "model" / "config.json").is_file()


def test_lora_settings_without_a_rank_are_named(tmp_path, capsys):
    """model.lora.r = 0 turns LoRA off: LoRA settings next to it do nothing, and the run says so up front."""
    base = ["train", str(ROOT / "recipes/tiny-kto.yaml"), "train.max_steps=1"]
    assert main([*base, "model.lora.target_modules=[q_proj]", "model.lora.alpha=32", f"output_dir={tmp_path / 'a'}"]) == 0
    out = capsys.readouterr().out
    assert ("model.lora.alpha, model.lora.target_modules: no effect, model.lora.r is 0 (LoRA off, every weight "
            "trains)") in out
    assert not (tmp_path / "a/model/adapter_config.json").exists()
    assert re.search(r"^model: tiny \(model\.tiny\), 107k parameters, 107k trainable \(100\.00 %\), loaded in "
                     r"\d+\.\d s$", out, flags=re.M), out
    assert main([*base, "model.tiny=null", f"model.path={tmp_path / 'a/model'}", "model.lora.r=4",
                 "model.lora.target_modules=[q_proj]", f"output_dir={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    # LoRA r=4 on q_proj (64 -> 64) in 2 layers: 2 × 4 × (64 + 64) = 1,024 adapter weights next to 107k
    assert "no effect" not in out and "108k parameters, 1.02k trainable (0.95 %)" in out, out
    # r = 0 on a folder of adapters keeps training them, with their own settings
    assert main([*base, "model.tiny=null", f"model.path={tmp_path / 'b/model'}", "model.lora.alpha=32",
                 f"output_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    assert f"model.lora.alpha: no effect, model.lora.r is 0 and {tmp_path / 'b/model'} holds LoRA adapters" in out
    assert (tmp_path / "c/model/adapter_config.json").is_file()
    assert (tmp_path / "b/model/adapter_config.json").is_file()


def test_eval_renders_prompts_as_the_run_was_trained(tmp_path, capsys):
    """`halokit eval --model RUN/model` reads data.chat_template from RUN/config.yaml; --chat-template wins."""
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/tiny-sft.yaml"), "train.max_steps=1", "data.chat_template=always",
                 f"output_dir={run}"]) == 0
    capsys.readouterr()
    args = ["eval", "--model", str(run / "model"), "--prompts", str(ROOT / "recipes/data/feedback.jsonl"),
            "--judge", "demo", "--limit", "2", "--samples", "1"]
    assert main(args) == 0
    assert f"prompts rendered with data.chat_template=always, as in training ({run / 'config.yaml'})" in \
        capsys.readouterr().out
    assert main([*args, "--chat-template", "auto"]) == 0
    assert "prompts rendered" not in capsys.readouterr().out


def test_train_unpairs_preferences_for_kto(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes/tiny-kto.yaml"), f"data.train={ROOT / 'recipes/data/preference.jsonl'}",
                 f"output_dir={tmp_path}", "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "64 preference pairs unpaired into 128 feedback examples" in out


def test_train_refuses_wrong_format(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes/tiny-dpo.yaml"), f"data.train={ROOT / 'recipes/data/sft.jsonl'}",
                 f"output_dir={tmp_path}"]) == 2
    assert "dpo trains on preference rows, but this file holds sft rows" in capsys.readouterr().err


def test_inspect_json_and_convert_roundtrip(tmp_path, capsys):
    pref = ROOT / "recipes/data/preference.jsonl"
    assert main(["data", "inspect", str(pref), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "preference" and summary["n_examples"] == 64
    fb = tmp_path / "fb.jsonl"
    assert main(["data", "convert", str(pref), "--to", "feedback", "--out", str(fb)]) == 0
    assert main(["data", "inspect", str(fb), "--json", "--tokenizer", "byte"]) == 0
    capsys.readouterr()
    back = tmp_path / "back.jsonl"
    assert main(["data", "convert", str(fb), "--to", "preference", "--out", str(back)]) == 0
    original = [json.loads(x) for x in pref.read_text().splitlines()]
    again = [json.loads(x) for x in back.read_text().splitlines()]
    # the same pairs come back (prompts asked twice are grouped, so compare as multisets)
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in again) == \
        sorted((r["prompt"], r["chosen"], r["rejected"]) for r in original)


def test_inspect_recommends_kto_weights(capsys):
    assert main(["data", "inspect", str(ROOT / "recipes/data/feedback.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "KTO weights: kto.desirable_weight=" in out and "Eq. 8" in out


def test_column_mapping_from_overrides(tmp_path, capsys):
    p = tmp_path / "logs.csv"
    p.write_text("question,answer,score\nhi,hello,0.9\nhey,go away,0.1\n")
    assert main(["data", "validate", str(p), "data.columns={prompt: question, completion: answer, label: score}",
                 "data.label_threshold=0.5"]) == 0
    assert "2 valid feedback rows" in capsys.readouterr().out
