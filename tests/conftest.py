"""Shared test set-up: offline, deterministic, quiet."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def byte_tok():
    from halokit.data.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer()
