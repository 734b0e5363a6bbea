"""Step-0 loss of halokit and TRL on the same batch and weights, in float32.

The reference is a perturbed copy of the policy, so that log-ratios, DPO margins and KTO's reference
point z₀ are far from 0 and the check can fail: at step 0 of a real run the policy *is* the reference
and every batch gives 0.5 (KTO) or ln 2 (DPO) on both sides.

KTO's KL pairs: halokit pairs prompt i with completion i + 1 of its micro-batch, TRL with completion
i − 1 (it rotates the completions of each batch by one). TRL is given the batch reversed, which makes
its pairs halokit's (``common.same_pairs_order``); with the batch in halokit's order instead the pairs
differ and so does z₀ (``pairing="trl-native"``, used by the tests to show the check is sensitive).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    BATCH_SIZE,
    BETA,
    LR,
    MAX_LENGTH,
    SEED,
    data_spec,
    encode,
    make_rows,
    same_pairs_order,
    tokenizer,
)

# A small Llama for the tests; the benchmark runs the check at its own shapes.
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "intermediate_size": 160}


def models(shape: dict, noise: float = 0.5, seed: int = SEED):
    """(policy, reference): a random Llama and a copy whose weights moved by ``noise`` × each tensor's std."""
    from halokit.models import build_tiny_model

    policy = build_tiny_model(shape, vocab_size=len(tokenizer()), seed=seed)
    reference = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp(min=1e-3))
    return policy, reference


def halokit_loss(method: str, policy, reference, records: list[dict], batch: list[int]) -> dict:
    """halokit's step on micro-batch ``batch``: collate (packed rows, KL pairs), LogpsModel, make_step."""
    from halokit.config import BetaSettings, KTOSettings
    from halokit.data.collate import collate
    from halokit.logprobs import LogpsModel
    from halokit.methods import Method
    from halokit.reference import ModelReference
    from halokit.steps import make_step

    settings = KTOSettings(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0) if method == "kto" \
        else BetaSettings(beta=BETA)
    step = make_step(Method(method), settings, reduce_mean=lambda t: t, kto_weights=(1.0, 1.0))
    pad = policy.config.pad_token_id
    data = collate(records, batch, with_kl=method == "kto", pad_id=pad, packing=True, row_tokens=MAX_LENGTH)
    loss, metrics = step(LogpsModel(policy), data, ModelReference(LogpsModel(reference)))
    out = {"loss": float(loss.detach())}
    if "kl" in metrics:
        out["kl"] = float(metrics["kl"][0])
    return out


def trl_loss(method: str, policy, reference, rows: list[dict], workdir: Path) -> dict:
    """TRL's ``compute_loss`` on the first batch of its train dataloader over ``rows`` (in file order)."""
    from datasets import Dataset

    if method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
        kwargs = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
        kwargs = {}
    args = Config(output_dir=str(workdir), per_device_train_batch_size=len(rows), learning_rate=LR, beta=BETA,
                  bf16=False, gradient_checkpointing=False, max_length=MAX_LENGTH, report_to="none",
                  use_cpu=True, seed=SEED, train_sampling_strategy="sequential", disable_tqdm=True, **kwargs)
    trainer = Trainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    parts = ["completion_ids"] if method == "kto" else ["chosen_ids", "rejected_ids"]
    out = {"loss": float(loss.detach()),
           "tokens": [[ex["prompt_ids"]] + [ex[p] for p in parts] for ex in trainer.train_dataset]}
    if method == "kto":
        out["kl"] = trainer._metrics["train"]["kl"][-1]
    return out


def step0_losses(method: str, shape: dict | None = None, *, pairing: str = "matched", data: str = "variable",
                 batch_size: int = BATCH_SIZE) -> dict:
    """halokit's and TRL's step-0 loss (and KTO's z₀) on the same ``batch_size`` examples and weights, float32.

    ``pairing``: ``matched`` feeds TRL the batch in the order that gives halokit's KL pairs;
    ``trl-native`` in halokit's order (TRL then pairs every prompt with the other neighbour's completion).
    """
    torch.manual_seed(SEED)
    rows = make_rows(method, data_spec(data, num_steps=1))[:batch_size]
    records = encode(method, rows)
    batch = list(range(batch_size))
    policy, reference = models(shape or SMALL)
    ours = halokit_loss(method, policy, reference, records, batch)
    order = same_pairs_order(batch) if method == "kto" and pairing == "matched" else batch
    with tempfile.TemporaryDirectory() as tmp:
        theirs = trl_loss(method, copy.deepcopy(policy), copy.deepcopy(reference), [rows[i] for i in order],
                          Path(tmp))
    parts = ["completion_ids"] if method == "kto" else ["chosen_ids", "rejected_ids"]
    same_tokens = theirs.pop("tokens") == [[records[i]["prompt_ids"]] + [records[i][p] for p in parts] for i in order]
    rel = abs(ours["loss"] - theirs["loss"]) / max(abs(theirs["loss"]), 1e-12)
    return {"method": method, "pairing": pairing, "halokit": ours, "trl": theirs, "rel_diff": rel,
            "same_tokens": same_tokens}


if __name__ == "__main__":
    for m in ("kto", "dpo"):
        print(json.dumps(step0_losses(m)))
