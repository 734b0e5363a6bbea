"""Shared by the end-to-end studies (demo, unlearning bench)."""

import pytest
import torch

from halokit.cli import main


@pytest.fixture(scope="session")
def run_quick(study_threads):
    """``run_quick(argv, settings_cls, out, smoke)``: the CLI ``argv + ["--quick", "--out", out]`` with
    ``study_threads`` torch threads (the studies are worth both cores; conftest sets 1 for small tests);
    ``smoke`` swaps ``settings_cls.quick`` for ``settings_cls.smoke`` (the plumbing only). Returns ``out``."""

    def run(argv: list[str], settings_cls, out, smoke: bool):
        before = torch.get_num_threads()
        torch.set_num_threads(study_threads)
        try:
            with pytest.MonkeyPatch.context() as mp:
                if smoke:
                    mp.setattr(settings_cls, "quick", classmethod(lambda cls, seed=0: cls.smoke(seed)))
                assert main([*argv, "--quick", "--out", str(out)]) == 0
        finally:
            torch.set_num_threads(before)
        return out

    return run
