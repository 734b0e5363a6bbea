"""Shared test set-up: offline, deterministic, quiet."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# reference caches go to a per-run temp dir, never to the user's ~/.cache (subprocesses inherit it)
os.environ["HALOKIT_CACHE"] = tempfile.mkdtemp(prefix="halokit-test-cache-")
atexit.register(shutil.rmtree, os.environ["HALOKIT_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def byte_tok():
    from halokit.data.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on shared cores OpenMP's spin-waits make
    in-process tests several times slower. Subprocess runs (the CLI end to end) keep the default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
