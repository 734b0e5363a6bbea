"""LoRA through peft: add adapters, ask whether a model has them, run it with them switched off."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from halokit.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["adapters_disabled", "add_lora", "has_adapters"]


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
             target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             seed: int = 0) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters stay trainable.

    ``target_modules=["all-linear"]`` adapts every linear layer but the LM head. The adapters'
    initialisation is fixed by ``seed`` without touching the global RNG.
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora.target_modules: {_first_line(err)}") from err


def _peft_model(model: nn.Module) -> PeftModel | None:
    """The ``PeftModel`` in ``model``, looking through DDP-style ``.module`` wrappers; None if none."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if isinstance(model, PeftModel) else None


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters."""
    return _peft_model(model) is not None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model (adapters off) inside the block: the LoRA reference.

    Raises ValueError for a model without adapters: there is no base model to fall back to.
    """
    peft_model = _peft_model(model)
    if peft_model is None:
        raise ValueError(f"adapters_disabled: {type(model).__name__} has no LoRA adapters to disable")
    with peft_model.disable_adapter():
        yield model


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence peft 0.21 warnings nobody can act on: it reads transformers' deprecated
    ``is_gradient_checkpointing``, and looks for a config.json next to a GGUF base when saving."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "Could not find a config file in .*\\.gguf", UserWarning)
        yield


def _first_line(err: BaseException) -> str:
    """The gist of an error message; a first line ending in ':' takes the next line along."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
