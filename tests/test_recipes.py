"""Every recipe in recipes/ is a valid config, and its header gives the command that runs it."""

from pathlib import Path

import pytest

from halokit.config import load_config
from halokit.methods import Method

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_is_a_tiny_recipe_for_every_method():
    names = {p.stem for p in RECIPES}
    assert {f"tiny-{m.value}" for m in Method} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_documents_its_command(path):
    cfg = load_config(path)
    header = path.read_text().splitlines()[:6]
    assert header[0].startswith("# ")
    assert any(f"halokit train recipes/{path.name}" in line for line in header)
    if path.stem.startswith("tiny-"):
        assert cfg.method == path.stem[len("tiny-"):]
        assert cfg.model.tiny is not None and cfg.model.tokenizer == "byte"
        for data_file in (cfg.data.train, cfg.data.forget, cfg.data.retain):
            assert data_file is None or (Path(__file__).parents[1] / data_file).is_file()
