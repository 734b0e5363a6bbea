"""What both sides of a benchmark share: model shapes, synthetic data, the batch plan, useful FLOPs,
the matmul ceiling probe and peak-RSS bookkeeping.

Everything here is deterministic given a seed, so a trial process rebuilds nothing: the parent writes
the model (safetensors) and the data (JSONL) once into a work directory and every trial reads them.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SEED = 0
BATCH_SIZE = 8
EPOCHS = 2  # the first compiles the run's kernels (a warm-up), the second is timed: see benchmarks/harness.py
LR = 1e-5
BETA = 0.1
MAX_LENGTH = 256
MAX_PROMPT_LENGTH = 128
ROW_TOKENS = MAX_LENGTH  # halokit's packed-row capacity (``halokit.prepare.collate_options``)

# Llama-style shapes (MHA, head dim 64, SwiGLU with the usual ~8/3 ratio, untied embeddings).
SHAPES: dict[str, dict] = {
    "head-heavy": {"vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "intermediate_size": 688},
    "body-heavy": {"vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                   "num_key_value_heads": 8, "intermediate_size": 1376},
}


@dataclass(frozen=True)
class DataSpec:
    """Synthetic examples: token lengths of prompts (with BOS) and completions (with EOS)."""

    name: str
    prompt_tokens: tuple[int, int]  # inclusive range
    completion_tokens: tuple[int, int]
    num_steps: int

    @property
    def num_examples(self) -> int:
        return self.num_steps * BATCH_SIZE


def data_spec(name: str, num_steps: int) -> DataSpec:
    """``variable``: prompts and completions of 8..64 tokens, uniform; ``fixed``: 36 + 36 (the same mean)."""
    if name == "variable":
        return DataSpec(name, (8, 64), (8, 64), num_steps)
    if name == "fixed":
        return DataSpec(name, (36, 36), (36, 36), num_steps)
    raise ValueError(f"unknown data variant {name!r}")


# ------------------------------------------------------------------------------------------ the data
def _text(rng: random.Random, tokens: int) -> str:
    # halokit's byte tokenizer: one token per ASCII letter; BOS (prompt) or EOS (completion) adds the last one
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(tokens - 1))


def make_rows(method: str, spec: DataSpec, seed: int = SEED) -> list[dict]:
    """Seeded rows: feedback (KTO, half of them desirable) or preference pairs (DPO)."""
    rng = random.Random(f"{seed}/{method}/{spec.name}")
    rows = []
    labels = [i % 2 == 0 for i in range(spec.num_examples)]
    rng.shuffle(labels)
    for i in range(spec.num_examples):
        prompt = _text(rng, rng.randint(*spec.prompt_tokens))
        if method == "kto":
            rows.append({"prompt": prompt, "completion": _text(rng, rng.randint(*spec.completion_tokens)),
                         "label": labels[i]})
        else:
            rows.append({"prompt": prompt, "chosen": _text(rng, rng.randint(*spec.completion_tokens)),
                         "rejected": _text(rng, rng.randint(*spec.completion_tokens))})
    return rows


def tokenizer():
    from halokit.data.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer()


def encode(method: str, rows: list[dict]) -> list[dict]:
    """halokit's token records of ``rows`` (the same ids TRL's tokenization gives, checked in the tests)."""
    from halokit.data.examples import FeedbackExample, PreferenceExample
    from halokit.data.tokenize import TokenizeSettings, encode_examples

    if method == "kto":
        examples = [FeedbackExample(r["prompt"], r["completion"], r["label"]) for r in rows]
    else:
        examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    records, _ = encode_examples(tokenizer(), examples, TokenizeSettings(MAX_LENGTH, MAX_PROMPT_LENGTH))
    return records


def plan_order(records: list[dict], seed: int = SEED) -> list[list[int]]:
    """The micro-batches halokit's fixed plan visits in epoch 0 (``halokit.data.plan.plan_batches``)."""
    from halokit.data.plan import plan_batches, sequence_lengths

    plan = plan_batches(sequence_lengths(records), micro_batch_size=BATCH_SIZE, grad_accum=1, num_processes=1,
                        seed=seed)
    return [list(plan.steps[k][0][0]) for k in plan.epoch_order(0, seed)]


def trl_steps(method: str, num_examples: int) -> list[list[int]]:
    """TRL's batches: the file in order (it is in random order already), ``BATCH_SIZE`` at a time.

    TRL's KTO requires its sequential sampler (the KL completions are precomputed against neighbours);
    DPO is given the same sampler so that the FLOP counter knows every batch.
    """
    return [list(range(k, k + BATCH_SIZE)) for k in range(0, num_examples - num_examples % BATCH_SIZE, BATCH_SIZE)]


def kl_partner(side: str, batch: list[int], k: int) -> int:
    """Whose completion the KL pair of ``batch[k]``'s prompt takes: halokit (i + 1) mod B (``collate.kl_pairs``),
    TRL (j − 1) mod B (``KTOTrainer._prepare_dataset`` rotates completions by one)."""
    return batch[(k + 1) % len(batch)] if side == "halokit" else batch[(k - 1) % len(batch)]


def same_pairs_order(batch: list[int]) -> list[int]:
    """A halokit micro-batch in the order that makes TRL's rotation build halokit's KL pairs: reversed."""
    return list(reversed(batch))


def sequences(method: str, record: dict) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) of every sequence one example puts through the policy with gradients."""
    p = len(record["prompt_ids"])
    if method == "kto":
        return [(p, len(record["completion_ids"]))]
    return [(p, len(record["chosen_ids"])), (p, len(record["rejected_ids"]))]


# ------------------------------------------------------------------------------------------ FLOPs
def forward_flops(shape: dict, prompt: int, completion: int, *, prompt_known: bool = False) -> float:
    """Useful forward FLOPs of one sequence: every linear layer on every token — except, in the last layer,
    o-proj and the MLP, which only the completion positions need (elsewhere the last layer serves only its
    keys and values) — causal attention, and the LM head on the completion positions (the prompt's
    next-token logits are never used). With ``prompt_known`` the prompt's layers were already computed (its
    keys and values are at hand): only the completion's tokens go through the layers, attending over prompt
    and completion."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    length = prompt + completion
    tokens = completion if prompt_known else length
    qkv, rest = h * (q + 2 * kv), q * h + 3 * h * i  # per token: projections feeding attention, and the rest
    linear = 2 * tokens * qkv * n + 2 * rest * (tokens * (n - 1) + completion)
    # QKᵀ and AV over the causal triangle: query t attends t + 1 keys
    attention = 2 * 2 * q * (length * (length + 1) - (prompt * (prompt + 1) if prompt_known else 0)) / 2
    return linear + n * attention + 2 * completion * h * shape["vocab_size"]


def step_flops(method: str, shape: dict, records: list[dict], batch: list[int], side: str) -> float:
    """Useful FLOPs of one optimizer step: 3× forward on the trained sequences (forward + backward) and,
    for KTO, 1× forward on the KL pairs (prompt i, completion i+1) under no_grad. A prompt counts once per
    example: a KL pair's prompt is trained sequence i's (same tokens, same positions), a rejected completion's
    prompt is the chosen one's, so only their completions go through the layers again.
    The reference is a one-off pass (cached) and not counted."""
    # a preference pair's rejected sequence starts with its chosen one's prompt: the prompt's layers run once
    total = sum(3 * forward_flops(shape, p, c, prompt_known=k > 0)
                for i in batch for k, (p, c) in enumerate(sequences(method, records[i])))
    if method == "kto":
        for k, i in enumerate(batch):
            j = kl_partner(side, batch, k)
            total += forward_flops(shape, len(records[i]["prompt_ids"]), len(records[j]["completion_ids"]),
                                   prompt_known=True)
    return total


def executed_flops(method: str, shape: dict, records: list[dict], batch: list[int], side: str) -> float:
    """Forward FLOPs a side actually runs for one step (×3 for trained sequences, ×1 for KL pairs), padding and
    all. TRL pads each batch to its longest sequence, applies the LM head at every position and attends each
    padded row in full. halokit (bf16, ``halokit.prepare.collate_options``) packs a micro-batch into one row
    rounded up to a shape bucket, attends each sequence in its own slot of the longest length rounded up to
    16 (``halokit.attention``), and applies the head to the completion positions, rounded up to a bucket;
    its KTO KL pass runs only each pair's suffix (the prompt's last token and the completion) and attends
    it after the prompt's recorded keys; a rejected sequence likewise runs only its suffix after the chosen
    one's prompt; its last layer runs o-proj and the MLP only where the head reads. Attention is counted as
    full squares on both sides (the kernels compute masked blocks too)."""
    from halokit.attention import SLOT_MULTIPLE, Segments
    from halokit.data.collate import bucket_size, layout, shared_prompt_layout, suffix_layout
    from halokit.prepare import ONE_ROW

    h, i, n, v = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    per_token = 2 * n * (4 * h * h + 3 * h * i)  # MHA projections + SwiGLU

    def halokit_cost(seq, factor: int) -> float:
        """A laid-out halokit row: its tokens, its (slots × width) attention grid, its bucketed head rows."""
        if seq.prefix is None:
            grid = Segments.from_position_ids(seq.position_ids)
            slots, width = grid.num, grid.width
        else:  # a slot holds the reused prefix and the segment's own tokens
            span = int((seq.prefix.reused + seq.prefix.sizes).max())
            slots, width = int(seq.prefix.sizes.numel()), -(-span // SLOT_MULTIPLE) * SLOT_MULTIPLE
        read = int(seq.completion_mask.sum())
        skipped = (seq.input_ids.numel() - read) * 2 * (h * h + 3 * h * i)  # last layer: o-proj and MLP unread
        return factor * (seq.input_ids.numel() * per_token - skipped + n * 4 * h * slots * width ** 2 +
                         bucket_size(read) * 2 * h * v)

    def trl_cost(pairs: list[tuple[list, list]], factor: int) -> float:
        rows, width = len(pairs), max(len(p) + len(c) for p, c in pairs)
        tokens, attention, head = rows * width, n * 4 * h * rows * width * width, rows * (width - 1)
        return factor * (tokens * per_token + attention + head * 2 * h * v)

    def ids(k: int, part: str) -> tuple[list, list]:
        return [0] * len(records[k]["prompt_ids"]), [0] * len(records[k][part])

    parts = ["completion_ids"] if method == "kto" else ["chosen_ids", "rejected_ids"]
    trained = [ids(k, part) for part in parts for k in batch]
    kl = [(ids(k, "completion_ids")[0], ids(kl_partner(side, batch, j), "completion_ids")[1])
          for j, k in enumerate(batch)] if method == "kto" else []
    if side != "halokit":
        return trl_cost(trained, 3) + (trl_cost(kl, 1) if kl else 0.0)
    if not kl:  # the rejected sequences continue the chosen ones' prompts
        return halokit_cost(shared_prompt_layout(trained, pad_id=0, bucket=True), 3)
    policy = layout(trained, pad_id=0, packing=True, row_tokens=ONE_ROW, bucket=True)
    return halokit_cost(policy, 3) + halokit_cost(suffix_layout(kl, policy.starts, pad_id=0, bucket=True), 1)


def step_tokens(method: str, records: list[dict], batch: list[int]) -> int:
    """Real (x, y) tokens of one step: prompt + completion of every trained sequence, no padding, no KL pairs."""
    return sum(p + c for i in batch for p, c in sequences(method, records[i]))


# ------------------------------------------------------------------------------------ matmul ceiling
def gemm_shapes(shape: dict, tokens: int, completion_tokens: int) -> list[tuple[int, int, int, int]]:
    """(count, m, k, n) of the step's GEMMs at the model's shapes: each linear layer's forward, input-gradient
    and weight-gradient products on ``tokens`` rows; the LM head on ``completion_tokens`` rows."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    out = []
    for count, fan_in, fan_out, m in ((4 * n, h, h, tokens), (2 * n, h, i, tokens), (n, i, h, tokens),
                                      (1, h, shape["vocab_size"], completion_tokens)):
        out += [(count, m, fan_in, fan_out), (count, m, fan_out, fan_in), (count, fan_out, m, fan_in)]
    return out


def matmul_ceiling(gemms: list[tuple[int, int, int, int]], dtype: torch.dtype, reps: int = 5,
                   min_seconds: float = 0.03) -> float:
    """Achieved FLOP/s of the GEMM mix ``gemms`` in ``dtype``: total FLOPs / total time, i.e. the rate a
    step made only of these matmuls would reach. Each shape is timed ``reps`` times (each time over enough
    calls to last ``min_seconds``) after a warm-up of the same length, and its best time counts: the probe
    asks what the machine can do right now, which a busy neighbour lowers less than it lowers a single
    timing. (On a shared AMX machine 3 × 10 ms probes spread by up to 2× run to run; 5 × 30 ms after a
    warm-up by ~10–25 %.)"""
    flops = seconds = 0.0
    for count, m, k, n in gemms:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        calls = max(1, round(min_seconds / max(time.perf_counter() - t, 1e-6)))
        for _ in range(calls):  # warm-up: kernels compiled, caches and clocks settled
            torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - t) / calls)
        flops += count * 2 * m * k * n
        seconds += count * best
    return flops / seconds


def fast_dtype(shape: dict | None = None) -> tuple[str, dict[str, float]]:
    """The matmul dtype this CPU trains faster in, and the GFLOP/s the probe measured for each.

    bf16 GEMMs are fast only where the CPU has bf16 dot-product instructions (AVX512-BF16, AMX): there they
    run 2-4x faster than float32. Without them (AVX2-only x86, e.g. Zen 2) oneDNN converts element by element
    and bf16 runs ~20x *slower* than float32 — a bf16 benchmark there would measure the emulation, and
    neither side's user would train that way. One body-heavy linear layer's product (128 x 512 x 1376) in
    each dtype decides; the benchmark's "best settings" then use the faster dtype on both sides."""
    shape = shape or SHAPES["body-heavy"]
    gemm = [(1, 128, shape["hidden_size"], shape["intermediate_size"])]
    rates = {name: matmul_ceiling(gemm, getattr(torch, name), reps=3, min_seconds=0.01) / 1e9
             for name in ("float32", "bfloat16")}
    return ("bfloat16" if rates["bfloat16"] >= rates["float32"] else "float32"), rates


# --------------------------------------------------------------------------------------------- RSS
def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS and return that baseline."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak RSS since the last :func:`reset_peak_rss`, bytes."""
    return _status("VmHWM")


# ------------------------------------------------------------------------------------- the workspace
@dataclass
class Workspace:
    """Files a trial reads, and per side what the parent derived from them: the batches of every step,
    their real tokens and useful FLOPs; the GEMM shapes of the matmul probe."""

    method: str
    shape_name: str
    data_name: str
    model_dir: str
    data_file: str
    steps: dict[str, list[list[int]]]
    tokens: dict[str, list[int]]
    flops: dict[str, list[float]]
    executed: dict[str, list[float]]
    gemms: list[list[int]]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> Workspace:
        return cls(**json.loads(Path(path).read_text()))


def build_model_dir(root: Path, shape_name: str) -> Path:
    """A randomly initialised Llama of ``shape_name`` (seed 0) saved as safetensors, built once."""
    out = root / f"model-{shape_name}"
    if (out / "config.json").is_file():
        return out
    from halokit.models import build_tiny_model

    tok = tokenizer()
    model = build_tiny_model(SHAPES[shape_name], vocab_size=len(tok), seed=SEED)
    tmp = root / f".model-{shape_name}-{os.getpid()}"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def build_workspace(root: Path, method: str, shape_name: str, data_name: str, num_steps: int) -> Path:
    """Write model and data for one benchmark cell and derive each side's steps; return the workspace file."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(root, shape_name)
    rows = make_rows(method, data_spec(data_name, num_steps))
    records = encode(method, rows)
    data_file = root / f"{method}-{data_name}-{num_steps}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shape = SHAPES[shape_name]
    steps = {"halokit": plan_order(records), "trl": trl_steps(method, len(records))}
    tokens = {side: [step_tokens(method, records, mb) for mb in s] for side, s in steps.items()}
    flops = {side: [step_flops(method, shape, records, mb, side) for mb in s] for side, s in steps.items()}
    executed = {side: [executed_flops(method, shape, records, mb, side) for mb in s] for side, s in steps.items()}
    mean_tokens = round(sum(tokens["halokit"]) / num_steps)
    mean_completion = round(sum(c for r in records for _, c in sequences(method, r)) / num_steps)
    ws = Workspace(method, shape_name, data_name, str(model_dir), str(data_file), steps, tokens, flops, executed,
                   [list(g) for g in gemm_shapes(shape, mean_tokens, mean_completion)])
    path = root / f"ws-{method}-{shape_name}-{data_name}-{num_steps}.json"
    ws.save(path)
    return path
