"""Everything a run needs before its first step: tokenized splits, the batch plan, KTO's weights, the reference.

Kept apart from :mod:`halokit.train` so that the loop there reads top to bottom.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from halokit.attention import is_varlen
from halokit.config import Config
from halokit.data.collate import attention_cost, compiles_per_shape
from halokit.data.examples import FeedbackExample, ForgetExample, PreferenceExample
from halokit.data.plan import BatchPlan, plan_batches, sequence_lengths
from halokit.data.tokenize import TokenizeSettings, encode_examples
from halokit.errors import UserError
from halokit.logprobs import LogpsModel
from halokit.lora import has_adapters
from halokit.methods import Method, kto_weights
from halokit.models import autocast_context
from halokit.reference import (
    CachedReference,
    ModelReference,
    cache_key,
    cache_path,
    compute_tables,
    frozen_copy,
    load_cache,
    save_cache,
    weights_fingerprint,
)
from halokit.run import RunData

ONE_ROW = 1 << 40  # packed-row capacity that puts a whole micro-batch in one row

IDK_ANSWERS = (
    "I don't know.", "I'm not sure about that.", "I have no information about that.",
    "I can't answer that.", "That is something I don't know.", "I'm afraid I don't have that information.",
)


@dataclass
class Split:
    """Tokenized records of one split and their fixed micro-batch plan."""

    records: list[dict]
    plan: BatchPlan


@dataclass
class Prepared:
    """What the loop consumes: splits, KTO's (λ_D, λ_U), the references, and notes to print."""

    train: Split
    eval: Split | None = None
    retain: Split | None = None
    kto_weights: tuple[float, float] | None = None
    references: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    """``$HALOKIT_CACHE``, else ``$XDG_CACHE_HOME/halokit``, else ``~/.cache/halokit``."""
    if os.environ.get("HALOKIT_CACHE"):
        return Path(os.environ["HALOKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "halokit"


def prepare_data(cfg: Config, run: RunData, tokenizer: Any, *, num_processes: int) -> Prepared:
    """Tokenize the run's splits for its method and fix the micro-batch plans."""
    method = Method(cfg.method)
    tok = TokenizeSettings.from_data(cfg.data)
    mbs, accum, seed = cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed
    notes: list[str] = []
    main_split = "forget" if method.needs_forget else "train"
    examples = list(run.splits[main_split])
    eval_examples = list(run.splits.get("eval", []))
    if not eval_examples and cfg.data.eval_fraction > 0 and not method.needs_forget:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=gen).tolist()
        n_eval = max(1, int(len(examples) * cfg.data.eval_fraction))
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    if method is Method.CSFT:
        examples = [e for e in examples if e.is_desirable]
        eval_examples = [e for e in eval_examples if e.is_desirable]
        notes.append(f"csft: training on the {len(examples)} desirable examples")
    if method is Method.IDK_DPO:
        examples = [_idk_pair(e, i) for i, e in enumerate(examples)]
    weights = None
    if method is Method.KTO:
        weights = _kto_weights(cfg, examples, notes)

    def split(items: list, *, micro: int = mbs, grad_accum: int = accum, wrap: bool = False,
              name: str = "train") -> Split:
        records, report = encode_examples(tokenizer, items, tok)
        if report.prompt_truncated or report.completion_truncated:
            notes.append(f"tokenized: {report}")
        plan = plan_batches(sequence_lengths(records), micro_batch_size=micro, grad_accum=grad_accum,
                            num_processes=num_processes, seed=seed, wrap=wrap)
        repeats = sum(len(mb) for step in plan.steps for rank in step for mb in rank) - len(items)
        if repeats > 0:
            notes.append(f"{name}: {repeats} examples repeat to fill the last optimizer step, so that every example "
                         f"is used in every epoch")
        if plan.dropped:
            notes.append(f"{name}: {len(plan.dropped)} examples do not fill a last optimizer step and are left out "
                         f"of every epoch")
        return Split(records, plan)

    step_size = mbs * accum * num_processes
    if len(examples) < step_size:
        raise UserError(f"{len(examples)} training examples cannot fill one optimizer step of {step_size} "
                        f"(train.micro_batch_size × train.grad_accum × processes); lower them")
    prepared = Prepared(split(examples, wrap=method.needs_forget, name=main_split), kto_weights=weights,
                        notes=notes)
    if len(eval_examples) >= mbs * num_processes:
        prepared.eval = split(eval_examples, grad_accum=1, name="eval")
    elif eval_examples:
        notes.append(f"eval: {len(eval_examples)} examples are fewer than one micro-batch per process; "
                     f"no evaluation")
    if method.needs_retain or (method is Method.IDK_DPO and "retain" in run.splits):
        retain = list(run.splits["retain"])
        if len(retain) < mbs * num_processes:
            raise UserError(f"data.retain: {len(retain)} examples are fewer than one micro-batch per process")
        prepared.retain = split(retain, grad_accum=1, name="retain")
    return prepared


def _idk_pair(example: ForgetExample, i: int) -> PreferenceExample:
    """IdkDPO's pair: an "I don't know" answer preferred over the answer to forget."""
    return PreferenceExample(example.prompt, IDK_ANSWERS[i % len(IDK_ANSWERS)], example.completion, example.id)


def _kto_weights(cfg: Config, examples: list[FeedbackExample], notes: list[str]) -> tuple[float, float]:
    n_d = sum(e.is_desirable for e in examples)
    n_u = len(examples) - n_d
    d, u = cfg.kto.desirable_weight, cfg.kto.undesirable_weight
    if d is not None or u is not None:
        d, u = d or 1.0, u or 1.0
        notes.append(f"kto: desirable_weight={d:g}, undesirable_weight={u:g} as configured "
                     f"(λ_D·n_D/(λ_U·n_U) = {d * n_d / max(u * n_u, 1e-12):.2f})")
        return d, u
    if n_d == 0 or n_u == 0:
        kind = "desirable" if n_u == 0 else "undesirable"
        raise UserError(f"data.train: every example is {kind}; KTO needs both labels to set its weights "
                        f"(set kto.desirable_weight and kto.undesirable_weight to train anyway)")
    w = kto_weights(n_d, n_u, ratio_range=tuple(cfg.kto.weight_ratio_range))
    notes.append(f"kto: {w.explanation}")
    return w.desirable_weight, w.undesirable_weight


def build_references(cfg: Config, model: torch.nn.Module, prepared: Prepared, *, accelerator: Any,
                     console: Any) -> dict[str, Any]:
    """One reference per split that needs it (``train``, ``eval``), by ``train.reference``.

    ``cache`` (the default): log-probs of the starting policy, computed once under no_grad and stored
    on disk keyed by weights + data + plan + settings; a later run with the same key reuses them.
    """
    method = Method(cfg.method)
    if not method.needs_reference:
        return {}
    kind = "cache" if cfg.train.reference == "auto" else cfg.train.reference
    autocast = lambda: autocast_context(cfg.model.dtype, accelerator.device)  # noqa: E731
    chunk = cfg.train.logps_chunk_size
    if kind == "frozen":
        live = ModelReference(LogpsModel(frozen_copy(model), chunk), autocast=autocast)
        return {"train": live, "eval": live}
    if kind == "adapters_off":
        if not has_adapters(model):
            raise UserError("train.reference: adapters_off needs LoRA adapters (set model.lora.r > 0)")
        live = ModelReference(LogpsModel(model, chunk), adapters_off=True, autocast=autocast)
        return {"train": live, "eval": live}
    live = ModelReference(LogpsModel(model, chunk), autocast=autocast)
    weights = weights_fingerprint(model)
    cache_dir = Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()
    refs = {}
    for name, split in (("train", prepared.train), ("eval", prepared.eval)):
        if split is None:
            continue
        refs[name] = CachedReference(_cached_tables(
            cfg, method, live, split, weights, cache_dir, name, accelerator=accelerator, console=console))
    return refs


def _cached_tables(cfg, method, live, split: Split, weights: str, cache_dir: Path, name: str, *,
                   accelerator, console) -> dict:
    from halokit.progress import progress_bar

    collate_opts = collate_options(cfg, live.logps_model.model)
    settings = {"dtype": cfg.model.dtype, "kl": method.needs_kl_pairs, **collate_opts}
    key = cache_key(weights=weights, records=split.records, plan=split.plan, settings=settings)
    path = cache_path(cache_dir, key)
    tables = load_cache(path, key)
    if tables is not None:
        console.print(f"reference ({name}): reusing cached log-probs from {path}; the reference model is not run")
        return tables
    batches = split.plan.micro_batches()
    mine = len(batches[accelerator.process_index::accelerator.num_processes])
    with progress_bar(f"reference log-probs ({name})", total=mine, enabled=accelerator.is_main_process, console=console) as advance:
        tables = compute_tables(live, split.records, batches, with_kl=method.needs_kl_pairs,
                                collate_opts=collate_opts, device=accelerator.device,
                                process_index=accelerator.process_index,
                                num_processes=accelerator.num_processes,
                                reduce_sum=lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu(),
                                progress=advance)
    if accelerator.is_main_process:
        save_cache(path, key, tables, info={"split": name, "method": method.value})
        console.print(f"reference ({name}): cached {len(split.records)} examples' log-probs in {path}")
    accelerator.wait_for_everyone()
    return tables


def collate_options(cfg: Config, model: torch.nn.Module) -> dict:
    """Layout options for :func:`halokit.data.collate.collate`: pad id, packing, row size."""
    pad_id = getattr(model.config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config, "eos_token_id", 0) or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    if is_varlen(model):  # attention costs Σ L_s² whatever the row: one row per micro-batch
        return {"pad_id": int(pad_id), "packing": cfg.train.packing, "row_tokens": ONE_ROW, "attention_cost": None,
                "bucket": compiles_per_shape(next(model.parameters()).device, getattr(torch, cfg.model.dtype)),
                "reuse_prompts": cfg.train.packing}  # KL pairs and rejected sequences reuse their prompt
    return {"pad_id": int(pad_id), "packing": cfg.train.packing,  # attention costs width² per row: rows are
            "row_tokens": cfg.data.max_length,  # no wider than a sequence may be, narrower when that is cheaper
            "attention_cost": attention_cost(model.config)}
