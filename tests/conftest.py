"""Shared test set-up: offline, deterministic, quiet."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def byte_tok():
    from halokit.data.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Reference caches go to a per-session temp dir, never to the user's ~/.cache."""
    monkeypatch.setenv("HALOKIT_CACHE", str(tmp_path_factory.getbasetemp() / "halokit-cache"))
