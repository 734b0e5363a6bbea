"""Batches: the layout of a micro-batch's sequences for one forward (the plan of micro-batches: ``data.plan``).

**KL pairs** (KTO, arXiv 2402.01306 §3): inside each micro-batch of B examples, prompt i is paired with
completion (i + 1) mod B, a mismatched pair whose log-ratio estimates the reference point z₀.

**Prompts once** (``reuse_prompts``, varlen attention). KL pair i starts with the very prompt that scored
sequence i starts with, at the same positions, and a preference pair's rejected sequence with its chosen
one's prompt: the second holds only its *suffix* — the prompt's last token and the completion — and a
:class:`Prefix` says whose prompt keys and values its attention puts first (:mod:`halokit.attention`),
so those prompts skip the linear layers.

**The layout.** Sequences (prompt ids + completion ids) are packed first-fit-decreasing into rows of
at most ``row_tokens`` tokens with ``position_ids`` restarting at 0 for each sequence and no attention
mask (padding-free attention, STACK.md), the rest of a row filled by one padding block that is its own
sequence and never scored. A packed row attends through a block-diagonal mask over its whole width,
so attention costs width² per row whatever it holds: given ``attention_cost`` (see
:func:`attention_cost`), the row capacity is the one among the longest sequence × 1, 2, 4, … and
``row_tokens`` that minimises rows × width × (1 + attention_cost × width). With ``packing=False`` each sequence gets its own row, padded to the batch
maximum (never to a global max_length), with an attention mask.

**Shape buckets.** With ``bucket=True`` the row width is rounded up by :func:`bucket_size` (at most
1/16 more tokens). bf16 matmuls on CPU (oneDNN, AMX) compile a kernel for every new shape, ~2–4 ms
each against ~0.3 ms for the product itself; without buckets every micro-batch's token count is new,
with them a run cycles through a few dozen widths and reuses their kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

Pair = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, completion_ids)


@dataclass(frozen=True)
class Prefix:
    """How the G segments of a batch continue other sequences: of the batch scored before it (KTO's KL pairs
    after the policy pass), or of this batch itself (``own``: a rejected completion after its chosen one).

    Segment g (in flat token order, each one contiguous) holds ``sizes[g]`` tokens whose positions
    start at ``reused[g]``; before them come the first ``reused[g]`` tokens of the sequence whose first
    token sits at flat index ``start[g]`` (r·T + t) of that batch's rows (unused where ``reused`` is 0).
    Whole sequences and padding have ``reused`` 0 and ``start`` −1.
    """

    start: Tensor  # (G,) int64
    reused: Tensor  # (G,) int64
    sizes: Tensor  # (G,) int64, summing to the suffix batch's R·T
    own: bool = False  # True: ``start`` indexes this batch's own rows (shared prompts within one pass)

    def to(self, device: torch.device | str) -> Prefix:
        """A copy on ``device``."""
        return Prefix(self.start.to(device), self.reused.to(device), self.sizes.to(device), self.own)


@dataclass
class SeqBatch:
    """Sequences laid out for one forward pass; ``S = num_sequences`` scored sequences."""

    input_ids: Tensor  # (R, L) int64
    position_ids: Tensor  # (R, L) int64
    completion_mask: Tensor  # (R, L) bool, True on completion tokens
    sequence_ids: Tensor | None  # (R, L) int64 output slot of each token (packed rows), None when padded
    attention_mask: Tensor | None  # (R, L) int64 (padded rows), None when packed
    num_sequences: int
    num_tokens: int  # real (non-padding) tokens
    starts: Tensor | None = None  # (S,) int64 flat index r·L + t of each sequence's first token in the rows
    prefix: Prefix | None = None  # a suffix batch: the prompts it continues (see Prefix)

    @property
    def sequence_tokens(self) -> int:
        """Real tokens of the scored sequences, a prefix reused from another sequence counted in full (a suffix
        batch lays out only its own tokens): Σ_s |x_s| + |y_s|."""
        return self.num_tokens + (int(self.prefix.reused.sum()) if self.prefix is not None else 0)

    def to(self, device: torch.device | str) -> SeqBatch:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SeqBatch(**{k: v.to(device) if isinstance(v, (Tensor, Prefix)) else v for k, v in moved.items()})


def attention_cost(config) -> float | None:
    """Cost of one token attending across one more position of its row, relative to the token's linear layers
    (per layer: 4·d_q FLOPs for QKᵀ and AV against 2·(q, k, v, o projections + SwiGLU) FLOPs), for a
    Llama-style ``config``; the ``attention_cost`` of :func:`layout`. None when the config lacks the sizes."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(config, "hidden_size", None)
    if not h or not getattr(config, "num_attention_heads", None):
        return None
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, getattr(config, "num_key_value_heads", config.num_attention_heads) * d
    mlp = getattr(config, "intermediate_size", 4 * h)
    return 4 * q / (2 * (h * (q + 2 * kv) + q * h + 3 * h * mlp))


def bucket_size(n: int, per_octave: int = 16, multiple: int = 16) -> int:
    """``n`` rounded up to the next of ``per_octave`` evenly spaced sizes per power of two, and to a multiple
    of ``multiple``: 600 → 608, 1000 → 1024, 17 → 32. Adds at most max(n/per_octave, multiple) − 1."""
    if n <= 0:
        return n
    step = max(multiple, 1 << max(0, n.bit_length() - 1 - (per_octave.bit_length() - 1)))
    return -(-n // step) * step


def compiles_per_shape(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether matmuls on ``device`` in ``dtype`` compile a kernel per new shape (bf16 on CPU: oneDNN), so that
    their shapes are worth bucketing."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def layout(pairs: Sequence[Pair], *, pad_id: int, packing: bool = True, row_tokens: int = 2048,
           attention_cost: float | None = None, bucket: bool = False) -> SeqBatch:
    """Lay out ``pairs`` (S of them, output slot s = position in ``pairs``) as packed or padded rows;
    ``bucket`` rounds packed rows' width up with :func:`bucket_size`."""
    seqs = [list(p) + list(c) for p, c in pairs]
    prompt_lens = [len(p) for p, _ in pairs]
    if not packing:
        return _padded(seqs, prompt_lens, pad_id)
    lengths = [len(s) for s in seqs]
    longest = max(lengths)
    capacity = max(row_tokens, longest)
    if attention_cost is not None:
        candidates = {capacity} | {longest << k for k in range(12) if longest << k < capacity}
        capacity = min(sorted(candidates), key=lambda c: _row_cost(_first_fit(lengths, c), c, attention_cost))
    rows, room = _first_fit(lengths, capacity)
    width = max(capacity - free for free in room)
    if bucket:
        width = bucket_size(width)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    sequence_ids = torch.zeros((n_rows, width), dtype=torch.long)
    completion_mask = torch.zeros((n_rows, width), dtype=torch.bool)
    starts = torch.zeros(len(seqs), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s in members:
            n = len(seqs[s])
            starts[s] = r * width + at
            input_ids[r, at:at + n] = torch.tensor(seqs[s])
            position_ids[r, at:at + n] = torch.arange(n)
            sequence_ids[r, at:at + n] = s
            completion_mask[r, at + prompt_lens[s]:at + n] = True
            at += n
        # the padding: blocks no longer than the longest sequence, each its own sequence, never scored
        position_ids[r, at:] = torch.arange(width - at) % longest
    return SeqBatch(input_ids, position_ids, completion_mask, sequence_ids, None, len(seqs),
                    sum(map(len, seqs)), starts)


def suffix_layout(pairs: Sequence[Pair], starts: Tensor, *, pad_id: int, bucket: bool = False) -> SeqBatch:
    """Pair s = (prompt_s, completion) laid out as its suffix only, continuing the prompt of the sequence
    that starts at flat index ``starts[s]`` of an earlier packed batch (the same prompt ids at the same
    positions): tokens prompt_s[a_s:] + completion at positions a_s, a_s + 1, …, with a_s = len(prompt_s) − 1
    (0 for an empty prompt), so that the prompt's last hidden state, which predicts the first completion
    token, is computed here. One row, sequences back to back, then padding blocks (own segments, never
    scored) up to ``bucket_size`` when ``bucket``. Returns a SeqBatch with a :class:`Prefix`."""
    pieces = [_suffix(p, c, s, int(starts[s])) for s, (p, c) in enumerate(pairs)]
    return _one_row(pieces, len(pairs), pad_id=pad_id, bucket=bucket, own=False)


def shared_prompt_layout(pairs: Sequence[Pair], *, pad_id: int, bucket: bool = False) -> SeqBatch:
    """Preference pairs (chosen block of B, then rejected block of B, rejected s with chosen s's prompt) in one
    row: the B chosen sequences in full, then each rejected sequence as its suffix only (prompt[-1:] +
    completion at positions a_s = len(prompt) − 1, …) whose attention puts the keys and values of the chosen
    sequence's first a_s tokens — this very pass's, with their gradients — before its own
    (:meth:`halokit.attention.Segments.continuing`). The prompt goes through the layers once per pair."""
    b = len(pairs) // 2
    if len(pairs) != 2 * b or any(list(pairs[s][0]) != list(pairs[b + s][0]) for s in range(b)):
        raise ValueError("shared_prompt_layout needs chosen then rejected blocks with the same prompts")
    pieces, starts, at = [], [], 0
    for s, (p, c) in enumerate(pairs[:b]):
        pieces.append(_Piece(list(p) + list(c), 0, len(p), s, -1, 0))
        starts.append(at)
        at += len(p) + len(c)
    pieces += [_suffix(p, c, b + s, starts[s]) for s, (p, c) in enumerate(pairs[b:])]
    return _one_row(pieces, len(pairs), pad_id=pad_id, bucket=bucket, own=True)


@dataclass(frozen=True)
class _Piece:
    tokens: list[int]
    first_position: int  # position of tokens[0]
    completion_from: int  # index in tokens of the first completion token
    sequence: int  # output slot
    start: int  # flat index of the sequence it continues (−1: none)
    reused: int  # tokens of that sequence before this piece


def _suffix(prompt: Sequence[int], completion: Sequence[int], sequence: int, start: int) -> _Piece:
    """(prompt, completion) as prompt[a:] + completion at positions a, a + 1, …, a = len(prompt) − 1 (0 for an
    empty prompt), continuing the first a tokens of the sequence that starts at flat index ``start``."""
    a = max(len(prompt) - 1, 0)
    return _Piece(list(prompt)[a:] + list(completion), a, len(prompt) - a, sequence, start, a)


def _one_row(pieces: list[_Piece], num_sequences: int, *, pad_id: int, bucket: bool, own: bool) -> SeqBatch:
    """``pieces`` back to back in one row, then padding blocks (own segments from position 0, never scored,
    none longer than the longest sequence) up to ``bucket_size`` when ``bucket``; with their :class:`Prefix`."""
    total = sum(len(x.tokens) for x in pieces)
    width = bucket_size(total) if bucket else total
    longest = max(x.reused + len(x.tokens) for x in pieces)
    pads = [min(longest, width - total - k) for k in range(0, width - total, longest)]
    ids, positions, sequence_ids, completion, starts = [], [], [], [], [0] * num_sequences
    for x in pieces:
        starts[x.sequence] = len(ids)
        n = len(x.tokens)
        ids += x.tokens
        positions += range(x.first_position, x.first_position + n)
        sequence_ids += [x.sequence] * n
        completion += [i >= x.completion_from for i in range(n)]
    ids += [pad_id] * (width - total)
    positions += [i for n in pads for i in range(n)]
    sequence_ids += [0] * (width - total)
    completion += [False] * (width - total)
    prefix = Prefix(torch.tensor([x.start for x in pieces] + [-1] * len(pads), dtype=torch.long),
                    torch.tensor([x.reused for x in pieces] + [0] * len(pads), dtype=torch.long),
                    torch.tensor([len(x.tokens) for x in pieces] + pads, dtype=torch.long), own)
    row = lambda values, dtype: torch.tensor([values], dtype=dtype)  # noqa: E731
    return SeqBatch(row(ids, torch.long), row(positions, torch.long), row(completion, torch.bool),
                    row(sequence_ids, torch.long), None, num_sequences, total,
                    torch.tensor(starts, dtype=torch.long), prefix)


def _first_fit(lengths: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """First fit decreasing: sequence indices per row, and each row's free room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[s]:
                rows[r].append(s)
                room[r] -= lengths[s]
                break
        else:
            rows.append([s])
            room.append(capacity - lengths[s])
    return rows, room


def _row_cost(packed: tuple[list[list[int]], list[int]], capacity: int, attention_cost: float) -> float:
    rows, room = packed
    width = max(capacity - free for free in room)
    return len(rows) * width * (1 + attention_cost * width)


def _padded(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> SeqBatch:
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        completion_mask[i, prompt_lens[i]:len(s)] = True
    position_ids = torch.arange(width).expand(n, width).clone()
    return SeqBatch(input_ids, position_ids, completion_mask, None, attention_mask, n, sum(map(len, seqs)))


def kl_pairs(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Pair]:
    """KTO's mismatched pairs within a micro-batch: (prompt i, completion (i+1) mod B), B >= 2."""
    b = len(prompts)
    if b < 2:
        raise ValueError("KTO's KL pairs need at least 2 examples per micro-batch")
    return [(prompts[i], completions[(i + 1) % b]) for i in range(b)]


# ------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """One micro-batch of B examples, ready for a training step.

    ``policy``: the scored sequences — B of them (sft, unpaired, unlearning), or 2B for pairs,
    chosen first: slots [0, B) chosen, [B, 2B) rejected. ``kl``: KTO's B mismatched pairs.
    ``retain``: a micro-batch of retain examples for unlearning methods with a retain term.
    """

    index: Tensor  # (B,) example indices into the dataset
    policy: SeqBatch
    kl: SeqBatch | None = None
    is_desirable: Tensor | None = None  # (B,) bool
    retain: SeqBatch | None = None

    @property
    def num_examples(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(self.index.to(device), self.policy.to(device), self.kl and self.kl.to(device),
                     None if self.is_desirable is None else self.is_desirable.to(device),
                     self.retain and self.retain.to(device))


def collate(records: Sequence[dict], indices: Sequence[int], *, with_kl: bool = False, pad_id: int = 0,
            packing: bool = True, row_tokens: int = 2048, attention_cost: float | None = None,
            bucket: bool = False, reuse_prompts: bool = False) -> Batch:
    """Build a :class:`Batch` from tokenized records (see ``data.tokenize.encode_examples``).

    Paired records (``chosen_ids``/``rejected_ids``) give 2B sequences; others B. ``with_kl`` adds
    KTO's KL pairs (prompt i, completion (i+1) mod B). ``reuse_prompts`` (packed rows, varlen attention only)
    runs every prompt through the layers once: KTO's KL pairs become a suffix batch that continues the scored
    sequences' prompts (:func:`suffix_layout`); a rejected completion continues its chosen one's prompt in the
    same pass (:func:`shared_prompt_layout`).
    """
    chosen = [records[i] for i in indices]
    opts = {"pad_id": pad_id, "packing": packing, "row_tokens": row_tokens, "attention_cost": attention_cost,
            "bucket": bucket}
    paired = "chosen_ids" in chosen[0]
    if paired:
        pairs = [(r["prompt_ids"], r["chosen_ids"]) for r in chosen] + \
                [(r["prompt_ids"], r["rejected_ids"]) for r in chosen]
    else:
        pairs = [(r["prompt_ids"], r["completion_ids"]) for r in chosen]
    reuse_prompts = reuse_prompts and packing
    if paired and reuse_prompts:  # each prompt through the layers once, for both completions
        policy = shared_prompt_layout(pairs, pad_id=pad_id, bucket=bucket)
    else:
        policy = layout(pairs, **opts)
    kl = None
    if with_kl:
        mismatched = kl_pairs([r["prompt_ids"] for r in chosen], [r["completion_ids"] for r in chosen])
        if reuse_prompts:  # pair i continues scored sequence i's prompt
            kl = suffix_layout(mismatched, policy.starts, pad_id=pad_id, bucket=bucket)
        else:
            kl = layout(mismatched, **opts)
    is_desirable = None
    if "is_desirable" in chosen[0]:
        is_desirable = torch.tensor([r["is_desirable"] for r in chosen], dtype=torch.bool)
    return Batch(torch.tensor(list(indices), dtype=torch.long), policy, kl, is_desirable)
