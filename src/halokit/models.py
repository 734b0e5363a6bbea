"""Models: build tiny ones, load (local safetensors, Hub id, GGUF), add LoRA, choose the compute dtype, save.

Master weights are always float32. ``bfloat16`` is a *compute* dtype, applied with
:func:`autocast_context` around forward passes, so optimizer updates never lose precision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from halokit.attention import use_varlen
from halokit.errors import ConfigError, UserError
from halokit.gguf_files import check_gguf, gguf_parsed_once
from halokit.last_layer import use_read_positions_only
from halokit.lean import use_lean_layers
from halokit.lora import _first_line, _peft_model, _quiet_peft, add_lora, has_adapters

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import LlamaForCausalLM, PreTrainedModel

    from halokit.config import ModelSettings

DTYPES = ("float32", "bfloat16")
# Small Llama defaults; the token ids are those of halokit's byte tokenizer (pad 0, bos 1, eos 2).
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# Keys people put in model.tiny that belong elsewhere.
_TINY_ELSEWHERE = {"dtype": "model.dtype", "torch_dtype": "model.dtype",
                   "attn_implementation": "model.attn_implementation"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# --------------------------------------------------------------------------------------------- build
def build_tiny_model(overrides: dict[str, Any] | None = None, *, vocab_size: int, seed: int = 0,
                     attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A small Llama from :data:`TINY_DEFAULTS` updated by ``overrides`` (LlamaConfig fields).

    The same seed gives bit-identical weights; the global RNG is left untouched. ``overrides`` may
    raise ``vocab_size`` above the tokenizer's (padding rows) but not below it.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.activations import ACT2FN

    overrides = dict(overrides or {})
    known = _llama_config_keys()
    for key in overrides:
        if key in _TINY_ELSEWHERE:
            raise ConfigError(f"model.tiny.{key}: not a model-shape field; set {_TINY_ELSEWHERE[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.tiny.{key}: unknown LlamaConfig field{hint}")
    values = {**TINY_DEFAULTS, "vocab_size": vocab_size, **overrides}
    try:  # LlamaConfig checks types and shapes itself (a strict dataclass in transformers 5)
        config = LlamaConfig(**values, attn_implementation="sdpa" if attn_implementation == "auto"
                             else attn_implementation)
    except (StrictDataclassError, TypeError, ValueError) as err:
        raise ConfigError(f"model.tiny: {_first_line(err)}") from err
    if config.vocab_size < vocab_size:
        raise ConfigError(f"model.tiny.vocab_size: the tokenizer has {vocab_size} tokens, got {config.vocab_size}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if kv_heads < 1 or heads % kv_heads:  # not checked by LlamaConfig; fails only at the first forward
        raise ConfigError(f"model.tiny.num_key_value_heads: must divide num_attention_heads ({heads}), "
                          f"got {kv_heads}")
    if config.hidden_act not in ACT2FN:
        raise ConfigError(f"model.tiny.hidden_act: unknown activation {config.hidden_act!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _llama_config_keys() -> set[str]:
    from transformers import LlamaConfig

    if dataclasses.is_dataclass(LlamaConfig):  # transformers >= 5
        keys = {f.name for f in dataclasses.fields(LlamaConfig)}
    else:
        keys = set(LlamaConfig().to_dict())
    # Legacy RoPE keys are still accepted and folded into rope_parameters.
    return keys | set(LlamaConfig.attribute_map) | {"rope_theta", "rope_scaling"}


# ---------------------------------------------------------------------------------------------- load
def load_model(path: str | os.PathLike, *, gguf_file: str | None = None, dtype: str = "float32",
               attn_implementation: str = "auto", trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM with float32 weights from a local directory, a Hub id, or a GGUF file.

    Local directories must hold safetensors (pickle checkpoints can run code when read). A directory
    holding a LoRA adapter loads its recorded base model and attaches the adapter (a ``PeftModel``).
    GGUF weights are dequantized to float32 and the "quantized" flag transformers leaves on them is
    removed, so the model trains and saves like any other. ``dtype`` is checked here but weights stay
    float32 either way: bfloat16 is applied at compute time by :func:`autocast_context`.
    ``attn_implementation="auto"``: transformers' own choice, SDPA or, for an architecture without an SDPA path
    (Gemma 2), the eager attention.
    """
    _check_dtype(dtype)
    with gguf_parsed_once():
        return _load_model(str(path), gguf_file, attn_implementation, trust_remote_code, dtype)


def _load_model(name: str, gguf_file: str | None, attn_implementation: str, trust_remote_code: bool,
                dtype: str) -> PreTrainedModel:
    if name.endswith(".gguf") and gguf_file is None:
        file = Path(name).expanduser()
        name, gguf_file = str(file.parent), file.name
    local = _is_local(name)
    if local:
        name = str(Path(name).expanduser())
        adapter = _check_local_model(Path(name), gguf_file)
        if adapter:
            return _load_adapter(Path(name), dtype=dtype, attn_implementation=attn_implementation,
                                 trust_remote_code=trust_remote_code)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:  # attn_implementation None: SDPA where the architecture has it, else eager
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, attn_implementation=None if attn_implementation == "auto" else
            attn_implementation, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(_load_failure(name, gguf_file, local, err)) from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)  # the weights are plain float32 tensors by now
        if local:  # recorded as an adapter's base model: point at the file, not its folder
            model.name_or_path = model.config.name_or_path = str(Path(name) / gguf_file)
    return model


def _is_local(name: str) -> bool:
    """Whether ``name`` means a path (it exists, looks like one, or cannot be a Hub id)."""
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.endswith(".gguf")
            or ".." in name or _HUB_ID.fullmatch(name) is None)


def _check_local_model(folder: Path, gguf_file: str | None) -> bool:
    """Refuse missing, pickle-only or truncated checkpoints up front; True when ``folder`` is an adapter."""
    if not folder.exists():
        raise UserError(f"{folder}: model path not found")
    if gguf_file is not None:
        check_gguf(folder / gguf_file)
        return False
    if not folder.is_dir():
        raise UserError(f"{folder}: expected a model directory or a .gguf file")
    if (folder / "adapter_config.json").is_file():
        return True
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{folder}: only pickle weights ({pickles[0]}); halokit loads safetensors only "
                            f"(re-save the model with save_pretrained)")
        raise UserError(f"{folder}: no *.safetensors weights in this directory")
    for file in weights:
        _check_safetensors(file)
    return False


def _check_safetensors(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):  # reads the header and checks it covers the file
            pass
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file}: unreadable safetensors file, truncated or corrupt ({_first_line(err)})") from err


def _load_adapter(folder: Path, **kwargs: Any) -> PeftModel:
    from peft import PeftModel

    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / 'adapter_config.json'}: unreadable ({_first_line(err)})") from err
    if not base:
        raise UserError(f"{folder}: a LoRA adapter that does not record its base model; load the base with "
                        f"load_model and attach it with peft.PeftModel.from_pretrained")
    _check_safetensors(folder / "adapter_model.safetensors")
    base_model = load_model(base, **kwargs)
    with _quiet_peft():
        return PeftModel.from_pretrained(base_model, str(folder), is_trainable=True)


def _load_failure(name: str, gguf_file: str | None, local: bool, err: Exception) -> str:
    what = f"{name}/{gguf_file}" if gguf_file else name
    if local:
        return f"{what}: cannot load the model ({_first_line(err)})"
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        return (f"{what}: not a local path and not in the Hugging Face cache; HF_HUB_OFFLINE is set, so it "
                f"cannot be downloaded")
    if not gguf_file and "safetensors" in str(err):
        return f"{what}: no safetensors weights on the Hub; halokit loads safetensors only"
    return f"{what}: cannot load the model from the Hugging Face Hub ({_first_line(err)})"


def load_policy(settings: ModelSettings, *, vocab_size: int | None = None,
                seed: int = 0) -> tuple[nn.Module, Any]:
    """The model to train and its tokenizer, from ``model.*`` settings, in train mode.

    Tiny models use the byte tokenizer unless ``settings.tokenizer`` says otherwise and get
    ``vocab_size`` rows (default: the tokenizer's size). Then: a pad token (falls back to EOS),
    lean norms and MLPs (``halokit.lean``), varlen attention (``halokit.attention``, with the last layer on the LM head's
    positions only: ``halokit.last_layer``) when ``attn_implementation`` is auto or varlen and the
    model qualifies, gradient checkpointing when asked, and LoRA when ``settings.lora.r > 0``. ``seed`` fixes the
    tiny model's and the LoRA weights' initialisation.
    """
    attn = "auto" if settings.attn_implementation in ("auto", "varlen") else settings.attn_implementation
    if settings.tiny is not None:
        tokenizer = load_tokenizer(settings.tokenizer or "byte", trust_remote_code=settings.trust_remote_code)
        model = build_tiny_model(settings.tiny, vocab_size=vocab_size or len(tokenizer), seed=seed,
                                 attn_implementation=attn)
    else:
        with gguf_parsed_once():  # a GGUF file holds both: parse it once
            model = load_model(settings.path, gguf_file=settings.gguf_file, dtype=settings.dtype,
                               attn_implementation=attn, trust_remote_code=settings.trust_remote_code)
            tokenizer = load_tokenizer(settings.tokenizer or settings.path,
                                       gguf_file=None if settings.tokenizer else settings.gguf_file,
                                       trust_remote_code=settings.trust_remote_code)
    _ensure_pad_token(tokenizer, model, settings.tokenizer or settings.path or "byte")
    from halokit.logprobs import check_plain_head

    check_plain_head(model)  # refuse a model halokit cannot score before data, reference or steps run
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{settings.path or 'model.tiny'}: the tokenizer has {len(tokenizer)} tokens but the "
                        f"model embeds only {rows}")
    use_lean_layers(model)  # same forward values, fewer activations kept for backward (halokit.lean)
    if settings.attn_implementation in ("auto", "varlen"):
        why = use_varlen(model)
        if why is not None and settings.attn_implementation == "varlen":
            raise ConfigError(f"model.attn_implementation=varlen: {settings.path or 'model.tiny'} cannot use it "
                              f"({why}); use auto or sdpa")
        if why is None:  # the last layer's MLP and o-proj only where the LM head reads (halokit.last_layer)
            use_read_positions_only(model)
    if settings.gradient_checkpointing:
        model.config.use_cache = False  # a cache is incompatible with recomputation
        model.activation_checkpointing_enable()  # also makes embedding outputs require grad, for LoRA
    if settings.lora.r > 0:
        if has_adapters(model):
            raise ConfigError(f"model.lora.r: {settings.path} already holds LoRA adapters; set model.lora.r=0 "
                              f"to keep training them")
        lora = settings.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=lora.target_modules, seed=seed)
    return model.train(), tokenizer


def _ensure_pad_token(tokenizer: Any, model: nn.Module, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local directory, a Hub id, a GGUF file, or ``"byte"`` (halokit's byte-level one).

    Raises UserError (not a traceback) when it cannot be found or read.
    """
    if name_or_path == "byte":
        from halokit.data.tokenizer import byte_level_tokenizer

        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        gguf_file, name_or_path = path.name, str(path.parent)
    if _is_local(name_or_path) and not Path(name_or_path).exists():
        raise UserError(f"{name_or_path}: tokenizer path not found")
    try:
        with gguf_parsed_once():
            return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file,
                                                 trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({_first_line(err)})") from err


# -------------------------------------------------------------------------------------- compute
def autocast_context(dtype: str, device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """The compute-dtype context: bfloat16 autocast on ``device``'s type, or nothing for float32.

    ``device`` defaults to CUDA when available, else CPU; pass the model's device to be explicit.
    """
    _check_dtype(dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.autocast(kind, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- save
def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *, merge_lora: bool = False) -> Path:
    """Write the final model (safetensors, Hugging Face layout) and tokenizer to ``out_dir`` atomically.

    A LoRA model is saved as its adapter (peft format), or with ``merge_lora`` as a plain model with
    the adapters merged in (``model`` itself is left unchanged). The files go to a temporary sibling
    directory first; an existing ``out_dir`` is replaced only once everything is written. Raises UserError,
    writing nothing, when the weights hold NaN/Inf or the disk is full.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    params = model.named_parameters()
    bad = next((n for n, p in params if p.is_floating_point() and not p.isfinite().all()), None)
    if bad is not None:
        raise UserError(f"{out}: not written, the weights hold NaN or Inf (first: {bad})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    for stale in [*out.parent.glob(f"{out.name}.tmp-*"), *out.parent.glob(f"{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save (the run lock excludes live ones)
    peft_model = _peft_model(model)
    target = peft_model if peft_model is not None else model
    if peft_model is not None and merge_lora:
        target = copy.deepcopy(peft_model).merge_and_unload()
    config = getattr(target, "config", None)
    cache_off = getattr(config, "use_cache", None) is False
    try:
        if cache_off:
            config.use_cache = True  # training turned the KV cache off; whoever loads the model wants it
        with _quiet_peft():
            target.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # disk full, permissions: any earlier model in out_dir is untouched
            raise UserError(f"{out}: the model could not be written ({err.strerror or err})") from err
        raise
    finally:
        if cache_off:
            config.use_cache = False
    _replace_dir(tmp, out)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is moved aside first and deleted last."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- helpers
def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: expected one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
