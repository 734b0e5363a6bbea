"""Sequence log-probs log π(y|x) from a causal LM, without ever building [B, T, V] logits.

    log π(y|x) = Σ_{t ∈ completion} log p(y_t | x, y_<t) = Σ_t ( z_t[y_t] − logsumexp(z_t) ),
    z_t = W h_{t−1} + b

Where the time and memory go in a naive implementation (DESIGN.md, "Performance design"): the LM
head on prompt and pad positions, and the full float32 logits. Here the backbone runs once, the
hidden states of the N positions that predict a completion token are gathered into (N, H), and the
head is applied to them chunk by chunk inside one autograd Function that keeps at most one
(chunk_size, V) block of logits alive, in the forward and in the backward.

Precision: the head matmuls run in the autocast dtype when autocast is on (bf16, like a plain
`lm_head` under autocast; the backbone's last norm returns float32 there, so the hidden states are
cast explicitly), else in the hidden states' dtype; the log-softmax always in float32 or wider, and
the head's weight gradient is summed over chunks in float32. Results are float32, float64 for a
float64 model.

Chunks hold at most ``chunk_size`` rows and at most ``MAX_BLOCK_ELEMENTS`` logits (16 MiB in float32),
so that a 150k-token vocabulary does not allocate gigabytes per chunk and each block stays in cache.

Packed rows (several sequences per row, `position_ids` restarting at 0) need no attention mask and
`use_cache=False`, or transformers silently attends across sequences (STACK.md); `sequence_logps`
enforces both. A model switched to varlen attention (:mod:`halokit.attention`) attends each packed
sequence on its own; otherwise transformers builds a block-diagonal mask over the row.

Distributed wrappers (DDP, FSDP) expect their own forward to run; `sequence_logps` calls the
backbone and the head directly, so pass it the unwrapped model only where gradients are synced
some other way (e.g. DeepSpeed ZeRO, or a single process).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from halokit.attention import KVRecord, decoder_kwargs, is_varlen
from halokit.data.collate import bucket_size, compiles_per_shape
from halokit.errors import UserError


class SequenceLogps(NamedTuple):
    """Per-sequence sums of completion-token log-probs."""

    sums: Tensor  # (S,) float32 (float64 for a float64 model): Σ_t log p(y_t | x, y_<t)
    counts: Tensor  # (S,) int64: number of completion tokens

    @property
    def means(self) -> Tensor:
        """(S,) mean token log-prob ā = sums / counts (SimPO, ORPO, SimNPO); 0 where count == 0."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)


MAX_BLOCK_ELEMENTS = 1 << 22  # logits per chunk: rows = min(chunk_size, max(64, this // V))
# Bumped whenever the numbers computed here change (reference caches are keyed by it). 2: bf16 head under autocast.
NUMERICS_VERSION = 2


class _ChunkedLinearLogSoftmax(torch.autograd.Function):
    """token_logps[n] = log_softmax(hidden[n] @ weight.T + bias)[targets[n]], chunked over n.

    Saves hidden (N, H), weight, bias, targets and logsumexp (N,); the backward recomputes each
    chunk's logits z and uses ∂ logp / ∂z = onehot(target) − softmax(z).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        with _no_autocast(hidden):
            logps, lse = _ChunkedLinearLogSoftmax._forward(hidden, weight, bias, targets, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def _forward(hidden, weight, bias, targets, chunk_size):
        mm_dtype, acc_dtype = _dtypes(hidden)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        logps = hidden.new_empty(hidden.shape[0], dtype=acc_dtype)  # (N,)
        lse = torch.empty_like(logps)  # (N,)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logits = _logits(hidden[sl], w, b, acc_dtype)  # (c, V)
            lse[sl] = torch.logsumexp(logits, dim=-1)
            logps[sl] = logits.gather(1, targets[sl, None]).squeeze(1) - lse[sl]
        return logps, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with _no_autocast(hidden):
            return _ChunkedLinearLogSoftmax._backward(
                grad_logps, hidden, weight, bias, targets, lse, ctx.needs_input_grad[:3], ctx.chunk_size
            )

    @staticmethod
    def _backward(grad_logps, hidden, weight, bias, targets, lse, needs_input_grad, chunk_size):
        need_h, need_w, need_b = needs_input_grad
        mm_dtype, acc_dtype = _dtypes(hidden)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        grad_logps = grad_logps.to(acc_dtype)
        # The head's gradient: each chunk's product in the matmul dtype (as a plain bf16 lm_head computes it),
        # summed over chunks in float32 at least, so that chunking never adds rounding.
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_b else None  # (V,)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            g = grad_logps[sl, None]  # (c, 1)
            # grad_logits = g · (onehot(target) − softmax(z)), built in place in the logits buffer
            grad_logits = _logits(hidden[sl], w, b, acc_dtype)  # (c, V)
            grad_logits.sub_(lse[sl, None]).exp_().mul_(-g)
            grad_logits.scatter_add_(1, targets[sl, None], g)
            if need_b:
                grad_b += grad_logits.sum(0).to(wide)
            grad_logits = grad_logits.to(mm_dtype)  # a no-op in float32
            if need_h:
                grad_h[sl] = (grad_logits @ w).to(hidden.dtype)
            if need_w and mm_dtype == wide:
                grad_w.addmm_(grad_logits.T, hidden[sl])
            elif need_w:
                grad_w += grad_logits.T @ hidden[sl]
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _dtypes(hidden: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): the hidden states' own, and float32 or wider."""
    return hidden.dtype, torch.promote_types(hidden.dtype, torch.float32)


def _no_autocast(hidden: Tensor) -> torch.autocast:
    """Autocast off inside the Function: its dtypes are chosen explicitly (see _dtypes), forward and
    backward alike, even when backward() is called under autocast."""
    return torch.autocast(hidden.device.type, enabled=False)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, acc_dtype: torch.dtype) -> Tensor:
    return nn.functional.linear(hidden, weight, bias).to(acc_dtype)  # (c, V)


def token_logps_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    targets: Tensor,
    chunk_size: int = 1024,
) -> Tensor:
    """log softmax(hidden @ W.T + b)[targets] per row, never holding more than chunk_size rows of logits
    (nor more than MAX_BLOCK_ELEMENTS logits).

    hidden (N, H), lm_head_weight W (V, H), lm_head_bias b (V,) or None, targets (N,) int64 → (N,).
    Differentiable in hidden, W and b; a frozen W (requires_grad False) gets no gradient work.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    chunk_size = min(chunk_size, max(64, MAX_BLOCK_ELEMENTS // lm_head_weight.shape[0]))
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):  # matmuls in the autocast dtype, as autocast would run lm_head
        low = torch.get_autocast_dtype(kind)
        if hidden.is_floating_point() and hidden.dtype.itemsize > low.itemsize:
            hidden = hidden.to(low)
    n = hidden.shape[0]
    rows = _bucketed_rows(n, chunk_size) if compiles_per_shape(hidden.device, hidden.dtype) else n
    if rows > n:  # zero rows with target 0: their log-probs are dropped, so they get no gradient
        hidden = nn.functional.pad(hidden, (0, 0, 0, rows - n))
        targets = nn.functional.pad(targets, (0, rows - n))
    logps = _ChunkedLinearLogSoftmax.apply(hidden, lm_head_weight, lm_head_bias, targets, chunk_size)
    return logps[:n]


def _bucketed_rows(n: int, chunk_size: int) -> int:
    """Rows to compute so that every chunk has one of few shapes: full chunks, and a last one of
    ``bucket_size`` rows (bf16 matmuls on CPU compile a kernel per new shape, see ``data.collate``)."""
    full, rest = divmod(n, chunk_size)
    return full * chunk_size + (min(bucket_size(rest), chunk_size) if rest else 0)


def sequence_logps_from_hidden(
    hidden: Tensor,
    lm_head: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
    target_idx: Tensor | None = None,
) -> SequenceLogps:
    """Sequence log-probs from the backbone's last hidden states (B, T, H); see `sequence_logps`.
    ``target_idx`` (N,): the flat indices of the completion tokens, when already computed."""
    B, T, H = hidden.shape
    if input_ids.shape != (B, T) or completion_mask.shape != (B, T) or completion_mask.dtype != torch.bool:
        raise ValueError(
            f"input_ids and completion_mask must be ({B}, {T}) and completion_mask bool; got "
            f"{tuple(input_ids.shape)}, {tuple(completion_mask.shape)} {completion_mask.dtype}"
        )
    if target_idx is None:
        target_idx = completion_mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat index of y_t
    if sequence_ids is None:
        seq, num_sequences = target_idx // T, B  # (N,) one sequence per row
    else:
        seq = sequence_ids.reshape(-1)[target_idx]  # (N,)
    _check_targets(target_idx, T, seq, num_sequences, sequence_ids, position_ids)
    pred_hidden = hidden.reshape(B * T, H).index_select(0, target_idx - 1)  # (N, H): h_{t−1} predicts y_t
    targets = input_ids.reshape(-1)[target_idx]  # (N,)
    bias = getattr(lm_head, "bias", None)
    logps = token_logps_from_hidden(pred_hidden, lm_head.weight, bias, targets, chunk_size)  # (N,)
    sums = logps.new_zeros(num_sequences).index_add(0, seq, logps)  # (S,)
    counts = torch.bincount(seq, minlength=num_sequences)  # (S,) int64
    return SequenceLogps(sums, counts)


def _check_targets(
    target_idx: Tensor,
    T: int,
    seq: Tensor,
    num_sequences: int,
    sequence_ids: Tensor | None,
    position_ids: Tensor | None,
) -> None:
    """Every completion token must be predicted from a position of its own sequence, index in [0, S)."""
    # One host sync, right after nonzero() has already synced: the checks cost ~nothing.
    starts = target_idx % T == 0
    if position_ids is not None:
        starts = starts | (position_ids.reshape(-1)[target_idx] == 0)
    bad = starts
    if sequence_ids is not None:
        prev_seq = sequence_ids.reshape(-1)[target_idx - 1]  # wraps at flat index 0, already flagged
        bad = bad | (prev_seq != seq) | (seq < 0) | (seq >= num_sequences)
    if bool(bad.any()):
        first = int(target_idx[bad][0])
        raise ValueError(
            f"completion token at (row {first // T}, position {first % T}) starts a sequence or has a "
            f"sequence id outside [0, {num_sequences}) or unlike its predecessor's; completion_mask marks "
            "the tokens y_t (not the positions t−1 that predict them), and never the first of a sequence"
        )


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    chunk_size: int = 1024,
    kv_record: KVRecord | None = None,
    prefix=None,
) -> SequenceLogps:
    """log π(y|x) = Σ_{t: completion_mask[t]} log p(input_ids[t] | input_ids[<t]) for each sequence.

    model: a Hugging Face causal LM (Llama, Qwen2, Mistral, …) or a peft model wrapping one.
    input_ids (B, T) int64; completion_mask (B, T) bool, True where the *token* is a completion token
    (predicted from the hidden state at t−1; never the first token of a row or packed sequence).

    Padded batches: one sequence per row (S = B); pass the padding `attention_mask` (B, T) if any.
    Packed rows: several sequences per row, `position_ids` (B, T) restarting at 0 for each,
    `sequence_ids` (B, T) int64 giving each token's output index in [0, num_sequences); no
    attention_mask. The backbone is always run with use_cache=False.

    Only the N completion positions reach the LM head, in chunks of `chunk_size` rows, so peak
    logits memory is chunk_size × V instead of B × T × V. Returns sums (S,) and counts (S,); a
    sequence without completion tokens gets sum 0, count 0, mean 0 and zero gradients.

    Prefix reuse (varlen attention, packed rows): ``kv_record`` collects every layer's keys and values;
    a suffix batch's ``prefix`` (:class:`halokit.data.collate.Prefix`) with the ``kv_record`` of the pass
    it continues scores its sequences as if each were preceded by its recorded prefix.
    """
    if (sequence_ids is None) != (num_sequences is None):
        raise ValueError("sequence_ids and num_sequences go together (packed rows)")
    if sequence_ids is not None and (position_ids is None or attention_mask is not None):
        raise ValueError(
            "packed rows need position_ids restarting at 0 per sequence and no attention_mask; "
            "otherwise attention silently crosses sequence boundaries"
        )
    # peft: the base model's modules still hold the injected LoRA layers (and honour disable_adapter)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_plain_head(causal_lm)
    extra = {"attention_mask": attention_mask}
    target_idx = None
    if sequence_ids is not None and is_varlen(causal_lm):  # each sequence attends only to itself
        # the positions h_{t−1} that predict completion tokens: all the LM head reads (halokit.last_layer)
        target_idx = completion_mask.reshape(-1).nonzero().squeeze(1)
        extra = decoder_kwargs(position_ids, record=kv_record, prefix=prefix, needed=(target_idx - 1).clamp(min=0))
    elif prefix is not None:
        raise ValueError("a suffix batch (prefix) needs packed rows and a model with varlen attention")
    hidden = causal_lm.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra
    ).last_hidden_state  # (B, T, H)
    return sequence_logps_from_hidden(
        hidden,
        causal_lm.get_output_embeddings(),
        input_ids,
        completion_mask,
        sequence_ids=sequence_ids,
        num_sequences=num_sequences,
        position_ids=position_ids,
        chunk_size=chunk_size,
        target_idx=target_idx,
    )


def check_plain_head(causal_lm: nn.Module) -> None:
    """Refuse models whose logits are not lm_head(last_hidden_state): the result would be silently wrong."""
    config = getattr(causal_lm, "config", None)
    if config is None:
        return
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise UserError(f"{type(causal_lm).__name__} transforms its logits ({name}={value}) after the LM head; "
                            f"halokit's log-probs assume logits = lm_head(hidden) and do not support it yet")


class LogpsModel(nn.Module):
    """``forward(seq_batch) -> SequenceLogps``: the unit that DDP/FSDP wrap, so that their forward runs.

    ``seq_batch`` is a :class:`halokit.data.collate.SeqBatch` (packed or padded rows).
    ``forward(seq_batch, follow)`` also scores ``follow`` under no_grad right after, and returns both:
    when ``follow`` is a suffix batch (``follow.prefix``) its sequences reuse the prompts' keys and
    values just computed for ``seq_batch`` instead of running the prompts again (KTO's KL pairs).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, seq, follow=None) -> SequenceLogps | tuple[SequenceLogps, SequenceLogps]:
        if follow is None:
            return self._logps(seq)
        record = KVRecord() if follow.prefix is not None else None
        try:
            logps = self._logps(seq, record)
            with torch.no_grad():
                return logps, self._logps(follow, record)
        finally:
            if record is not None:
                record.close()

    def _logps(self, seq, record: KVRecord | None = None) -> SequenceLogps:
        packed = seq.sequence_ids is not None
        return sequence_logps(
            self.model,
            seq.input_ids,
            seq.completion_mask,
            attention_mask=seq.attention_mask,
            position_ids=seq.position_ids,
            sequence_ids=seq.sequence_ids,
            num_sequences=seq.num_sequences if packed else None,
            chunk_size=self.chunk_size,
            kv_record=record,
            prefix=seq.prefix,
        )
