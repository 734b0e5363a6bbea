"""The README's commands and code run: every `halokit ...` line in its ```sh blocks, and its Python block."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def halokit_lines():
    return [line.strip() for lang, body in BLOCKS if lang == "sh" for line in body.splitlines()
            if line.strip().startswith("halokit ")]


def test_readme_commands_run(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    lines = halokit_lines()
    assert len(lines) >= 5
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for line in lines:
        args = shlex.split(line.split(" #")[0])[1:]
        proc = subprocess.run([sys.executable, "-m", "halokit", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert "Traceback" not in proc.stderr, line
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "runs/unpaired.jsonl").read_text().count("\n") == 128
    assert (tmp_path / "runs/tiny-kto/model/model.safetensors").is_file()


def test_readme_python_block_runs():
    (code,) = [body for lang, body in BLOCKS if lang == "python"]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.losses.shape == (2,) and not out.rewards.requires_grad


def test_readme_mentions_both_make_targets():
    assert "make demo" in README and "make test" in README


def test_every_guarantee_names_tests_that_exist():
    """Each ``file::test`` in the Guarantees table (``::test`` alone: the same file as the one before it)."""
    section = README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`((?:tests/[\w/]+\.py)?::\w+)`", section)
    assert len(cited) >= 14
    file = None
    for ref in cited:
        path, name = ref.split("::")
        file = path or file
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), ref
