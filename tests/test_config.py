"""Config: YAML + dotted overrides, typed validation with messages naming key, value and what is allowed."""

import pytest
import yaml

from halokit.config import (
    Config,
    DataSettings,
    describe,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from halokit.errors import ConfigError

BASE = ["model.tiny={}", "data.train=x.jsonl"]


def load(*overrides, path=None):
    return load_config(path, [*BASE, *overrides])


def test_defaults_and_overrides_are_typed():
    cfg = load("train.lr=1e-5", "train.micro_batch_size=4", "kto.beta=0.2", "model.lora.r=8",
               "model.lora.target_modules=[q_proj, v_proj]", "train.adam_betas=[0.9, 0.95]")
    assert cfg.train.lr == pytest.approx(1e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == 4
    assert cfg.kto.beta == 0.2
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.method_settings is cfg.kto


def test_comma_list_and_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: dpo\nmodel: {tiny: {hidden_size: 32}}\ndata: {train: d.jsonl}\ndpo: {beta: 0.3}\n")
    cfg = load_config(p, ["model.lora.target_modules=q_proj,k_proj"])
    assert cfg.method == "dpo" and cfg.dpo.beta == 0.3 and cfg.model.tiny == {"hidden_size": 32}
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", 'train.lr: expected a positive float, got "fast"'),
    ("train.lr=-1", "train.lr: expected a positive float, got -1"),
    ("train.lrr=1", "train.lrr: unknown key; did you mean 'train.lr'?"),
    ("trian.lr=1", "trian: unknown key; did you mean 'train'?"),
    ("kto.beta=0", "kto.beta: expected a positive float, got 0"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size: expected a positive integer, got 2.5"),
    ("train.schedule=exp", "train.schedule: expected one of 'constant', 'linear', 'cosine', got \"exp\""),
    ("train.packing=maybe", 'train.packing: expected true or false, got "maybe"'),
    ("method=ppo", 'method: expected one of sft, csft, kto'),
    ("data.on_bad_row=ignore", "data.on_bad_row: expected one of 'error', 'skip'"),
    ("cdpo.label_smoothing=0.5", "cdpo.label_smoothing: expected a float in [0, 0.5), got 0.5"),
    ("data.max_prompt_length=2000", "data.max_prompt_length: expected less than data.max_length (1024), got 2000"),
    ("train.micro_batch_size=1", "train.micro_batch_size: kto pairs each prompt with another example's "
                                 "completion inside a micro-batch, so it needs at least 2, got 1"),
    ("data.columns.answer=x", "data.columns.answer: unknown halokit field"),
    ("train=3", "train: expected a mapping of keys, got 3"),
    ("train.adam_betas=[0.9]", "train.adam_betas: expected two floats in [0, 1), got [0.9]"),
])
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert message in str(err.value)


def test_method_requirements():
    with pytest.raises(ConfigError, match="data.forget: npo unlearns a forget set"):
        load_config(None, ["model.tiny={}", "method=npo"])
    with pytest.raises(ConfigError, match="data.retain: npo_rt regularises on a retain set"):
        load_config(None, ["model.tiny={}", "method=npo_rt", "data.forget=f.jsonl"])
    with pytest.raises(ConfigError, match="data.train: dpo needs training data"):
        load_config(None, ["model.tiny={}", "method=dpo"])
    with pytest.raises(ConfigError, match="set exactly one of model.path"):
        load_config(None, ["data.train=x", "model.path=a", "model.tiny={}"])
    cfg = load_config(None, ["model.tiny={}", "method=ga", "data.forget=f.jsonl"])
    assert cfg.method_settings is None


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("method: kto\ntrain:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line \d"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        load_config(p)


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("output_dir=runs/x") == ("output_dir", "runs/x")
    assert parse_override("x=") == ("x", "")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load("method=kto", "method.beta=1")


def test_save_roundtrip(tmp_path):
    cfg = load("train.lr=3e-6", "model.lora.r=4", "method=simpo", "simpo.gamma=1.0")
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 3e-6
    assert load_config(path) == cfg
    assert to_dict(cfg)["train"]["adam_betas"] == [0.9, 0.999]


def test_describe_lists_every_key_with_doc():
    rows = {key: doc for key, _, doc in describe()}
    assert "train.lr" in rows and "model.lora.r" in rows and "kto.desirable_weight" in rows
    assert all(doc for doc in rows.values()), [k for k, d in rows.items() if not d]


def test_data_settings_alone():
    assert DataSettings().on_bad_row == "error"
    with pytest.raises(ConfigError, match="also listed in data.undesirable_values"):
        DataSettings(desirable_values=["ok"], undesirable_values=["OK"])
    assert Config.__doc__
