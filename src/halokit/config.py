"""halokit's run configuration: typed dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

The schema is the code below; :mod:`halokit.typed` does the checking. Any unknown key, wrong type or
invalid value raises :class:`~halokit.errors.ConfigError` naming the dotted key, the bad value and
what is allowed, e.g. ``train.lr: expected a positive float, got "fast"``.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from halokit.data.examples import DEFAULT_DESIRABLE, DEFAULT_UNDESIRABLE
from halokit.errors import ConfigError
from halokit.methods import Method
from halokit.typed import build, parse_override, read_yaml, set_dotted, to_dict
from halokit.typed import count as _count
from halokit.typed import describe as _describe
from halokit.typed import fraction as _fraction
from halokit.typed import opt as _opt
from halokit.typed import positive as _positive

__all__ = ["Config", "DataSettings", "ModelSettings", "TrainSettings", "build", "describe", "load_config",
           "parse_override", "save_config", "set_dotted", "to_dict"]


# --------------------------------------------------------------------------------------------- model
@dataclass
class LoraSettings:
    """LoRA adapters through peft; ``r = 0`` trains all weights."""

    r: int = _count("LoRA rank; 0 disables LoRA and trains every weight", 0, minimum=0)
    alpha: float = _positive("LoRA scaling numerator (scale = alpha / r)", 16.0)
    dropout: float = _fraction("dropout on the LoRA input", 0.0, closed_top=False)
    target_modules: list[str] = _opt(doc="module names to adapt, or ['all-linear']",
                                     factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = _opt(False, "merge the adapters into the weights when saving the final model")

    def ignored(self) -> list[str]:
        """The LoRA settings that differ from their defaults while ``r = 0`` turns LoRA off (they do nothing)."""
        if self.r:
            return []
        return [f.name for f in fields(self) if f.name != "r"
                and getattr(self, f.name) != (f.default_factory() if f.default is MISSING else f.default)]


@dataclass
class ModelSettings:
    """Which model to train and how to hold it in memory."""

    path: str | None = _opt(None, "local directory, Hugging Face Hub id, or a .gguf file")
    gguf_file: str | None = _opt(None, "GGUF file name inside `path` (when path is a directory)")
    tiny: dict[str, Any] | None = _opt(None, "build a small Llama-style model from these LlamaConfig fields "
                                             "instead of loading one (tests, demo; no download)")
    tokenizer: str | None = _opt(None, "tokenizer directory or Hub id; default: the model's; 'byte' for "
                                       "halokit's byte-level tokenizer")
    dtype: Literal["float32", "bfloat16"] = _opt("float32", "compute dtype; bfloat16 uses autocast over "
                                                            "float32 master weights")
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager"] = _opt(
        "auto", "attention kernel: varlen (packed rows attend per sequence, halokit.attention), sdpa or eager; "
                "auto = varlen where the model allows it, else sdpa (eager for an architecture without "
                "an SDPA path)")
    bf16_weights: bool = _opt(True, "with dtype=bfloat16, full fine-tuning and one process: bf16 weights in the "
                                    "model, float32 master weights in the optimizer (halokit.precision); false: "
                                    "autocast over float32 weights")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = _opt(False, "allow model code from the Hub to run (off unless you trust it)")
    lora: LoraSettings = _opt(doc="LoRA settings", factory=LoraSettings)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ConfigError("model: set exactly one of model.path (a model to load) or model.tiny "
                              "(a config to build a small model from)")


# ---------------------------------------------------------------------------------------------- data
DataFormat = Literal["feedback", "preference", "sft", "forget"]


@dataclass
class DataSettings:
    """Where the examples come from and how they become tokens."""

    train: str | None = _opt(None, "training data: .jsonl/.json/.csv/.parquet, a saved datasets "
                                   "directory, or a Hub id")
    eval: str | None = _opt(None, "held-out data in the same format (optional)")
    eval_fraction: float = _opt(0.0, "share of `train` held out for evaluation when `eval` is not set",
                                expect="a float in [0, 0.5]", valid=lambda v: 0.0 <= v <= 0.5)
    format: DataFormat | None = _opt(None, "row format; default: what the method needs")
    split: str = _opt("train", "split to read from a datasets directory or Hub id")
    forget: str | None = _opt(None, "forget set for unlearning methods")
    retain: str | None = _opt(None, "retain set for unlearning methods that regularise on it")
    columns: dict[str, str] = _opt(doc="map halokit field -> your column, e.g. {prompt: question}",
                                   factory=dict)
    desirable_values: list[str] = _opt(doc="label strings read as desirable (case-insensitive)",
                                       factory=lambda: list(DEFAULT_DESIRABLE))
    undesirable_values: list[str] = _opt(doc="label strings read as undesirable (case-insensitive)",
                                         factory=lambda: list(DEFAULT_UNDESIRABLE))
    label_threshold: float | None = _opt(None, "numeric labels: score >= threshold is desirable "
                                               "(default: only 0/1 are accepted)")
    chat_template: Literal["auto", "always", "never"] = _opt(
        "auto", "auto: chat template for chat-message rows, plain text for strings")
    max_length: int = _count("most tokens per prompt + completion", 1024, minimum=2)
    max_prompt_length: int = _count("most prompt tokens", 512)
    prompt_truncation: Literal["keep_end", "keep_start"] = _opt("keep_end", "which part of a long prompt "
                                                                            "to keep")
    completion_truncation: Literal["keep_start", "keep_end"] = _opt("keep_start", "which part of a long "
                                                                                  "completion to keep")
    on_bad_row: Literal["error", "skip"] = _opt("error", "error: stop at a bad row; skip: drop it and "
                                                         "record it in bad_rows.jsonl")

    def __post_init__(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"data.max_prompt_length: expected less than data.max_length "
                              f"({self.max_length}), got {self.max_prompt_length}")
        allowed = {"prompt", "completion", "label", "chosen", "rejected", "role", "id"}
        for name in self.columns:
            if name not in allowed:
                raise ConfigError(f"data.columns.{name}: unknown halokit field; allowed: "
                                  f"{', '.join(sorted(allowed))}")
        overlap = {v.lower() for v in self.desirable_values} & {v.lower() for v in self.undesirable_values}
        if overlap:
            raise ConfigError(f"data.desirable_values: {sorted(overlap)} also listed in "
                              f"data.undesirable_values")


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainSettings:
    """Optimisation, logging and checkpoint cadence."""

    lr: float = _positive("peak learning rate (AdamW)", 5e-6)
    micro_batch_size: int = _count("examples per forward/backward on each process", 8)
    grad_accum: int = _count("micro-batches per optimizer step", 1)
    max_steps: int = _count("optimizer steps; 0 runs `epochs` epochs", 0, minimum=0)
    epochs: float = _positive("passes over the data when max_steps is 0", 1.0)
    warmup_ratio: float = _fraction("share of steps with linear warmup", 0.1, closed_top=False)
    schedule: Literal["constant", "linear", "cosine"] = _opt("constant", "learning-rate schedule after warmup")
    weight_decay: float = _opt(0.0, "AdamW weight decay", expect="a non-negative float",
                               valid=lambda v: v >= 0)
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas", expect="two floats in [0, 1)",
                                           valid=lambda v: all(0.0 <= b < 1.0 for b in v))
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables", expect="a non-negative float",
                                valid=lambda v: v >= 0)
    seed: int = _opt(42, "random seed", expect="an integer in [0, 2**32)", valid=lambda v: 0 <= v < 2**32)
    log_every: int = _count("optimizer steps between logged metrics", 10)
    eval_every: int = _count("optimizer steps between evaluations; 0 only at the end", 0, minimum=0)
    save_every: int = _count("optimizer steps between checkpoints; 0 only at the end", 0, minimum=0)
    keep_checkpoints: int = _count("checkpoints kept on disk", 2)
    max_nonfinite_steps: int = _count("consecutive NaN/Inf steps before the run stops", 3)
    packing: bool = _opt(True, "pack sequences without padding when the attention backend allows it")
    logps_chunk_size: int = _count("completion tokens per LM-head chunk", 1024)
    reference: Literal["auto", "cache", "frozen", "adapters_off"] = _opt(
        "auto", "reference model: cache (log-probs on disk), frozen copy, or LoRA adapters disabled")
    cache_dir: str | None = _opt(None, "where reference caches live (default: inside the run directory)")
    trackers: list[str] = _opt(doc="accelerate trackers, e.g. [tensorboard, wandb]", factory=list)

    def __post_init__(self) -> None:
        if self.lr >= 1e30:  # AdamW's step lr / (1 - β1^t) would overflow float32: a traceback, not a NaN
            raise ConfigError(f"train.lr: expected a positive float below 1e30, got {self.lr:g}")


# ------------------------------------------------------------------------------- method hyper-params
def _beta(default: float) -> Any:
    return _positive("inverse temperature β", default)


def _retain_weight() -> Any:
    return _opt(1.0, "weight of the NLL on the retain set", expect="a non-negative float",
                valid=lambda v: v >= 0)


def _weight(doc: str) -> Any:
    return _opt(None, doc, expect="a positive float or null", valid=lambda v: v > 0)


@dataclass
class KTOSettings:
    """KTO (arXiv 2402.01306)."""

    beta: float = _beta(0.1)
    desirable_weight: float | None = _weight("λ_D; null: chosen from the data by the paper's rule")
    undesirable_weight: float | None = _weight("λ_U; null: chosen from the data by the paper's rule")
    weight_ratio_range: tuple[float, float] = _opt(
        (1.0, 4 / 3), "target interval for λ_D·n_D / (λ_U·n_U)", expect="two floats 0 < lo <= hi",
        valid=lambda v: 0 < v[0] <= v[1])


@dataclass
class BetaSettings:
    """Methods whose only hyper-parameter is β (DPO, IPO, APO-zero, NPO)."""

    beta: float = _beta(0.1)


@dataclass
class CDPOSettings:
    """Conservative DPO: DPO with label smoothing ε (Mitchell 2023)."""

    beta: float = _beta(0.1)
    label_smoothing: float = _opt(0.1, "probability ε that a preference label is flipped",
                                  expect="a float in [0, 0.5)", valid=lambda v: 0.0 <= v < 0.5)


@dataclass
class SLiCSettings:
    """SLiC-HF calibration (arXiv 2305.10425)."""

    delta: float = _positive("margin δ", 1.0)
    nll_weight: float = _opt(0.1, "weight λ of the NLL on chosen", expect="a non-negative float",
                             valid=lambda v: v >= 0)


@dataclass
class SimPOSettings:
    """SimPO (arXiv 2405.14734)."""

    beta: float = _beta(2.0)
    gamma: float = _opt(0.5, "target reward margin γ", expect="a non-negative float", valid=lambda v: v >= 0)


@dataclass
class ORPOSettings:
    """ORPO (arXiv 2403.07691)."""

    lam: float = _positive("weight λ of the odds-ratio term", 0.1)


@dataclass
class RetainSettings:
    """Gradient difference: GA on forget plus NLL on retain."""

    retain_weight: float = _retain_weight()


@dataclass
class NPORTSettings:
    """NPO with a retain term (arXiv 2404.05868)."""

    beta: float = _beta(0.1)
    retain_weight: float = _retain_weight()


@dataclass
class SimNPOSettings:
    """SimNPO (arXiv 2410.07163)."""

    beta: float = _beta(2.5)
    gamma: float = _opt(0.0, "reward margin γ", expect="a non-negative float", valid=lambda v: v >= 0)
    retain_weight: float = _retain_weight()


@dataclass
class IdkDPOSettings:
    """DPO with refusals as chosen and forget answers as rejected, plus a retain term."""

    beta: float = _beta(0.1)
    retain_weight: float = _retain_weight()
    idk_answers: str | None = _opt(None, "text file of refusal answers, one per line (default: built-in)")


# -------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    """A whole run. Only the section named by ``method`` is used among the method sections."""

    method: str = _opt("kto", "training objective", expect="one of " + ", ".join(m.value for m in Method),
                       valid=lambda v: v in {m.value for m in Method})
    output_dir: str = _opt("runs/halokit", "run directory: config.yaml, metrics.jsonl, checkpoints, model")
    resume: bool = _opt(False, "continue from the last checkpoint in output_dir")
    model: ModelSettings = _opt(doc="model", factory=lambda: ModelSettings(tiny={}))
    data: DataSettings = _opt(doc="data", factory=DataSettings)
    train: TrainSettings = _opt(doc="training", factory=TrainSettings)
    kto: KTOSettings = _opt(doc="KTO", factory=KTOSettings)
    apo_zero_unpaired: BetaSettings = _opt(doc="APO-zero (unpaired)", factory=BetaSettings)
    dpo: BetaSettings = _opt(doc="DPO", factory=BetaSettings)
    cdpo: CDPOSettings = _opt(doc="cDPO", factory=CDPOSettings)
    ipo: BetaSettings = _opt(doc="IPO", factory=BetaSettings)
    slic: SLiCSettings = _opt(doc="SLiC", factory=SLiCSettings)
    simpo: SimPOSettings = _opt(doc="SimPO", factory=SimPOSettings)
    orpo: ORPOSettings = _opt(doc="ORPO", factory=ORPOSettings)
    npo: BetaSettings = _opt(doc="NPO", factory=BetaSettings)
    npo_rt: NPORTSettings = _opt(doc="NPO + retain", factory=NPORTSettings)
    gd: RetainSettings = _opt(doc="gradient difference", factory=RetainSettings)
    simnpo: SimNPOSettings = _opt(doc="SimNPO", factory=SimNPOSettings)
    idk_dpo: IdkDPOSettings = _opt(doc="IdkDPO", factory=IdkDPOSettings)

    def __post_init__(self) -> None:
        method = Method(self.method)
        if method.needs_kl_pairs and self.train.micro_batch_size < 2:
            raise ConfigError(f"train.micro_batch_size: {method.value} pairs each prompt with another "
                              f"example's completion inside a micro-batch, so it needs at least 2, got "
                              f"{self.train.micro_batch_size}")
        if method.needs_forget and self.data.forget is None:
            raise ConfigError(f"data.forget: {method.value} unlearns a forget set; set data.forget to a file")
        if method.needs_retain and self.data.retain is None:
            raise ConfigError(f"data.retain: {method.value} regularises on a retain set; set data.retain "
                              f"to a file")
        if not method.needs_forget and self.data.train is None:
            raise ConfigError(f"data.train: {method.value} needs training data; set data.train to a file")

    @property
    def method_settings(self) -> Any:
        """The hyper-parameter section of ``method`` (None for methods without any)."""
        return {
            "kto": self.kto, "apo_zero_unpaired": self.apo_zero_unpaired, "dpo": self.dpo, "cdpo": self.cdpo,
            "ipo": self.ipo, "slic": self.slic, "simpo": self.simpo, "orpo": self.orpo, "npo": self.npo,
            "npo_rt": self.npo_rt, "gd": self.gd, "simnpo": self.simnpo, "idk_dpo": self.idk_dpo,
        }.get(self.method)


# ------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply ``key=value`` overrides.

    Overrides use dotted keys (``train.lr=1e-5``, ``model.lora.r=8``); values are parsed as YAML, so
    lists (``[a, b]``) and mappings work. Raises ConfigError on any unknown key or invalid value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(values, key, value)
    return build(Config, values)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as ``RUN_DIR/config.yaml`` (reloadable with :func:`load_config`)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")  # one per process: every rank writes it
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(path)
    return path



def describe(cls: type = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every config key as ``(dotted key, default, doc)``, for ``halokit train --keys``."""
    return _describe(cls or Config, prefix)
