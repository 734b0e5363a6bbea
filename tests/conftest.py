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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on shared cores OpenMP's spin-waits make
    in-process tests several times slower. Subprocess runs (the CLI end to end) keep the default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
