"""Nothing halokit reads can run code: safetensors and JSON only, YAML through safe_load, no remote code
unless asked, and damaged weight files are refused with one line.

``unsafe_calls`` reads halokit's own source (its syntax tree, so comments and messages that mention
pickle do not count) for the calls that can execute what a file contains.
"""

import ast
from pathlib import Path

import pytest
import torch

import halokit
from halokit.cli import main
from halokit.config import load_config
from halokit.errors import ConfigError, UserError
from halokit.models import build_tiny_model, load_model, load_policy, load_tokenizer, save_model

ROOT = Path(__file__).parents[1]
SRC = Path(halokit.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
SAFE_YAML = {"safe_load", "safe_dump", "YAMLError"}


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """Every construct in ``source`` that can run code from data, as ``name:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr not in SAFE_YAML:
            found.append(f"{where}: yaml.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}: {func}()")
        if func.endswith("torch.load") and keywords.get("weights_only") != "True":
            found.append(f"{where}: torch.load without weights_only=True")
        if func.endswith(("jit.load", "read_pickle")) or keywords.get("allow_pickle") == "True":
            found.append(f"{where}: {func}(...)")
        if keywords.get("trust_remote_code") == "True":
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_scanner_finds_what_it_looks_for():
    sample = ("import pickle\nimport yaml, torch, numpy as np\nfrom dill import loads\nyaml.load(s)\n"
              "yaml.unsafe_load(s)\ntorch.load(f)\ntorch.load(f, weights_only=True)\neval(row)\nexec(code)\n"
              "np.load(f, allow_pickle=True)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
              "yaml.safe_load(s)\nmodel.eval()\n")
    assert sorted(line.split(": ", 1)[1] for line in unsafe_calls(sample)) == sorted([
        "imports pickle", "imports dill", "yaml.load", "yaml.unsafe_load", "torch.load without weights_only=True",
        "eval()", "exec()", "np.load(...)", "trust_remote_code=True"])


def test_halokit_source_has_no_call_that_runs_code_from_data():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(SRC)))]
    assert found == []


def test_yaml_tags_that_would_run_code_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'method: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["train", str(recipe)]) == 2
    assert "invalid YAML at line 1: could not determine a constructor for the tag" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.lr: expected a positive float"):
        load_config(ROOT / "recipes/tiny-kto.yaml", [f'train.lr=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


class Refused(Exception):
    pass


def test_remote_code_is_off_unless_asked(monkeypatch):
    """Every path to from_pretrained passes trust_remote_code=False by default, and safetensors only."""
    import transformers

    calls = []

    def record(cls, name, *args, **kwargs):
        calls.append((cls.__name__, kwargs))
        raise OSError("not here")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(record))
    assert all(load_config(r).model.trust_remote_code is False for r in sorted(ROOT.glob("recipes/*.yaml")))
    for asked in (False, True):
        settings = load_config(None, ["data.train=x.jsonl", "model.tiny=null", "model.path=some-org/some-model",
                                      f"model.trust_remote_code={str(asked).lower()}"]).model
        with pytest.raises(UserError):
            load_policy(settings)
        with pytest.raises(UserError):
            load_tokenizer("some-org/some-model", trust_remote_code=asked)
    assert [(name, kw["trust_remote_code"]) for name, kw in calls] == [
        ("AutoModelForCausalLM", False), ("AutoTokenizer", False), ("AutoModelForCausalLM", True),
        ("AutoTokenizer", True)]
    assert calls[0][1]["use_safetensors"] is True
    with pytest.raises(UserError):
        load_model("some-org/some-model")
    assert calls[-1][1]["trust_remote_code"] is False


PICKLE_OR_ZIP = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle, torch.save


def test_a_run_writes_nothing_a_loader_could_execute(tmp_path, monkeypatch):
    """Checkpoints, the reference cache and the final model: safetensors, JSON, YAML, and the tokenizer's chat
    template (Jinja, which transformers renders in a sandbox)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HALOKIT_CACHE", str(cache))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/tiny-kto.yaml"), "train.max_steps=1",
                 f"data.train={ROOT / 'recipes/data/feedback.jsonl'}", f"output_dir={run}"]) == 0
    written = [p for p in [*run.rglob("*"), *cache.rglob("*")] if p.is_file()]
    (ref,) = cache.glob("ref-*")
    assert ref.suffix == ".safetensors" and any(p.parent.name.startswith("step-") for p in written)
    for path in written:
        assert path.suffix in (".safetensors", ".json", ".jsonl", ".yaml", ".jinja") or path.name == "COMPLETE", path
        assert not path.read_bytes().startswith(PICKLE_OR_ZIP), path


@pytest.mark.parametrize("damage", ["truncated", "pickle only"])
def test_damaged_or_pickled_weights_are_refused_through_the_cli(damage, tmp_path, capsys):
    """(Truncated GGUF files: tests/test_models.py::test_truncated_gguf_is_a_user_error.)"""
    from halokit.data.tokenizer import byte_level_tokenizer

    model_dir = save_model(build_tiny_model(vocab_size=259), byte_level_tokenizer(), tmp_path / "m")
    weights = model_dir / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        message = f"{weights}: unreadable safetensors file, truncated or corrupt"
    else:
        torch.save({}, model_dir / "pytorch_model.bin")  # a pickle: never opened
        weights.unlink()
        message = f"{model_dir}: only pickle weights (pytorch_model.bin); halokit loads safetensors only"
    code = main(["train", str(ROOT / "recipes/tiny-kto.yaml"), "model.tiny=null", f"model.path={model_dir}",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"halokit train: error: {message}") and err.count("\n") == 1
