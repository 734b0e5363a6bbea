"""Cached pipeline stages shared by the built-in studies (``halokit demo``, ``halokit unlearn bench``).

Each stage is skipped when its output already exists in the run directory, so a rerun resumes a study.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from halokit.config import load_config, save_config


def cached_tokenizer(out: Path, texts: Sequence[str], vocab_size: int = 1000) -> Path:
    """``out/tokenizer``: a BPE tokenizer trained on ``texts`` (``train_bpe_tokenizer``), built once."""
    from halokit.data.tokenizer import train_bpe_tokenizer

    path = out / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        train_bpe_tokenizer(list(texts), vocab_size=vocab_size).save_pretrained(str(path))
    return path


def train_stage(run_dir: Path, console: Console, overrides: list[str], on_step=None) -> Path:
    """One ``halokit train`` run in ``run_dir`` (rows of at most 96 tokens, prompts of 48), skipped when
    its final model exists already; returns the model directory. ``on_step``: see :func:`halokit.train.train`."""
    from halokit.run import prepare_run
    from halokit.train import train

    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        console.print(f"{run_dir.name}: done earlier, reusing {model_dir}")
        return model_dir
    cfg = load_config(None, [*overrides, f"output_dir={run_dir}", "data.max_length=96",
                             "data.max_prompt_length=48"])
    run = prepare_run(cfg)
    save_config(cfg, run.run_dir)
    console.print(f"[bold]{run_dir.name}[/bold]: {cfg.method}, {cfg.train.max_steps} steps")
    return train(cfg, run, on_step=on_step)
