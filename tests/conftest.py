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
# `make test` runs two pytest-xdist workers on the 2 cores: each worker, and every CLI subprocess it starts,
# keeps to one thread (two workers with two OpenMP threads each oversubscribe the cores and spin-wait)
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

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


@pytest.fixture(scope="session")
def study_threads() -> int:
    """Threads for the long studies (demo, unlearning): both cores when pytest runs alone, one per xdist worker."""
    return 1 if PARALLEL else 2
