"""Chunked sequence log-probs equal the naive full-logits computation, in values and gradients.

The naive reference, for a padded batch:
    logp[b, t] = log_softmax(model(input_ids).logits[b, t − 1])[input_ids[b, t]]
    sums[b] = Σ_t completion_mask[b, t] · logp[b, t],   counts[b] = Σ_t completion_mask[b, t]
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from halokit.logprobs import (
    SequenceLogps,
    sequence_logps,
    sequence_logps_from_hidden,
    token_logps_from_hidden,
)

V, H = 97, 32
# (prompt length, completion length) per sequence; the third has no completion tokens.
LENGTHS = [(3, 4), (5, 2), (4, 0), (1, 6), (2, 3)]


def tiny_llama(
    *, tie: bool = False, attn: str = "sdpa", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked next-token distributions, so gradients are far from uniform
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).to(dtype)


def sequences(lengths=LENGTHS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids (L,), completion_mask (L,)) per sequence, tokens in [1, V)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, c in lengths:
        ids = torch.randint(1, V, (p + c,), generator=g)
        mask = torch.arange(p + c) >= p
        out.append((ids, mask))
    return out


def padded(seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, completion_mask, attention_mask), each (B, T)."""
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.int64)
    completion_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.int64)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, : len(ids)], completion_mask[i, : len(ids)], attention_mask[i, : len(ids)] = ids, mask, 1
    return input_ids, completion_mask, attention_mask


def packed(seqs, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pack sequences into rows (lists of sequence indices), right-padded by a pseudo-sequence of id −1."""
    width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    parts = {k: [] for k in ("input_ids", "completion_mask", "position_ids", "sequence_ids")}
    for row in rows:
        pieces = [(seqs[i][0], seqs[i][1], i) for i in row]
        pad = width - sum(len(ids) for ids, _, _ in pieces)
        pieces.append((torch.zeros(pad, dtype=torch.int64), torch.zeros(pad, dtype=torch.bool), -1))
        parts["input_ids"].append(torch.cat([ids for ids, _, _ in pieces]))
        parts["completion_mask"].append(torch.cat([m for _, m, _ in pieces]))
        parts["position_ids"].append(torch.cat([torch.arange(len(ids)) for ids, _, _ in pieces]))
        parts["sequence_ids"].append(torch.cat([torch.full((len(ids),), i) for ids, _, i in pieces]))
    return {k: torch.stack(v) for k, v in parts.items()}


def naive_sequence_logps(model, input_ids, completion_mask, attention_mask=None) -> SequenceLogps:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T − 1)
    mask = completion_mask[:, 1:]
    return SequenceLogps((logp * mask).sum(1), mask.sum(1))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_of(out: SequenceLogps) -> torch.Tensor:
    """A scalar that weighs each sequence differently and uses the means too."""
    weights = torch.linspace(0.5, 2.0, len(out.sums), dtype=out.sums.dtype)
    return (weights * out.sums).sum() + out.means.sum()


def assert_grads_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_values_match_naive_on_padded_batch(dtype, tol):
    model = tiny_llama(dtype=dtype)
    input_ids, completion_mask, attention_mask = padded(sequences())
    with torch.no_grad():
        out = sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=4)
        ref = naive_sequence_logps(model, input_ids, completion_mask, attention_mask)
    assert out.sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.sums, ref.sums, atol=tol, rtol=tol)
    assert out.counts.tolist() == [c for _, c in LENGTHS] == ref.counts.tolist()
    # The sequence without completion tokens: exactly 0, not NaN.
    assert out.sums[2].item() == 0 and out.means[2].item() == 0
    assert torch.isfinite(out.means).all()
    torch.testing.assert_close(out.means[0], out.sums[0] / 4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_grads_match_naive_float64(tie):
    model = tiny_llama(tie=tie, dtype=torch.float64)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    input_ids, completion_mask, attention_mask = padded(sequences())
    loss_of(naive_sequence_logps(model, input_ids, completion_mask, attention_mask)).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    loss_of(
        sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=3)
    ).backward()
    assert len(expected) == len(list(model.parameters()))
    assert_grads_close(grads(model), expected, atol=1e-10, rtol=1e-8)


def test_sequence_without_completion_gets_zero_gradients():
    model = tiny_llama(dtype=torch.float64)
    input_ids, completion_mask, attention_mask = padded(sequences())
    out = sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask)
    (out.sums[2] + out.means[2]).backward()
    for name, g in grads(model).items():
        assert torch.all(g == 0), name


def test_chunk_size_does_not_change_values_or_grads():
    model = tiny_llama(dtype=torch.float64)
    input_ids, completion_mask, attention_mask = padded(sequences())  # N = 15 completion tokens
    results = []
    for chunk_size in (1, 3, 15, 10_000):
        model.zero_grad(set_to_none=True)
        out = sequence_logps(
            model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=chunk_size
        )
        loss_of(out).backward()
        results.append((out.sums.detach(), grads(model)))
    for sums, g in results[1:]:
        torch.testing.assert_close(sums, results[0][0], atol=1e-12, rtol=1e-12)
        assert_grads_close(g, results[0][1], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_chunked_head(with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 11, (7,), generator=g)
    inputs = (hidden, weight, bias, targets, 3)
    assert torch.autograd.gradcheck(token_logps_from_hidden, inputs)
    # and the value is the plain log-softmax
    expected = (
        nn.functional.linear(hidden, weight, bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    )
    torch.testing.assert_close(token_logps_from_hidden(*inputs), expected, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    chunk_size=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_from_hidden_matches_full_logits_on_random_masks(B, T, chunk_size, seed):
    """Any mask (first column off), any chunking, a head with bias: equal to full logits + log_softmax."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, 6, dtype=torch.float64, generator=g)
    head = nn.Linear(6, 13, bias=True).double()
    input_ids = torch.randint(0, 13, (B, T), generator=g)
    completion_mask = torch.rand(B, T, generator=g) < 0.6
    completion_mask[:, 0] = False
    out = sequence_logps_from_hidden(hidden, head, input_ids, completion_mask, chunk_size=chunk_size)
    logp = head(hidden)[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.sums, (logp * completion_mask[:, 1:]).sum(1), atol=1e-12, rtol=0)
    assert out.counts.tolist() == completion_mask.sum(1).tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_padded_batch(attn):
    model = tiny_llama(attn=attn)
    seqs = sequences()
    input_ids, completion_mask, attention_mask = padded(seqs)
    out = sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=4)
    loss_of(out).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    batch = packed(seqs, rows=[[1, 0, 4], [3, 2]])  # three sequences in row 0, two plus padding in row 1
    assert batch["input_ids"].shape == (2, 19)
    out_packed = sequence_logps(model, **batch, num_sequences=len(seqs), chunk_size=4)
    torch.testing.assert_close(out_packed.sums, out.sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_packed.counts, out.counts)
    loss_of(out_packed).backward()
    assert_grads_close(grads(model), expected, atol=1e-5, rtol=1e-4)


def test_packed_rows_reject_settings_that_attend_across_sequences():
    model = tiny_llama()
    batch = packed(sequences(), rows=[[0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="no attention_mask"):
        sequence_logps(model, **batch, num_sequences=5, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="position_ids"):
        sequence_logps(
            model,
            batch["input_ids"],
            batch["completion_mask"],
            sequence_ids=batch["sequence_ids"],
            num_sequences=5,
        )
    with pytest.raises(ValueError, match="go together"):
        sequence_logps(
            model, batch["input_ids"], batch["completion_mask"], sequence_ids=batch["sequence_ids"]
        )


def test_rejects_completion_token_that_starts_a_sequence():
    """Regression guard for the off-by-one of passing a labels-style (shifted) mask."""
    model = tiny_llama()
    input_ids, completion_mask, attention_mask = padded(sequences())
    with pytest.raises(ValueError, match=r"row 3, position 0"):
        sequence_logps(model, input_ids, completion_mask.roll(-1, dims=1), attention_mask=attention_mask)
    batch = packed(sequences(), rows=[[0, 3]])
    batch["completion_mask"][0, 7] = True  # first token of the second packed sequence
    with pytest.raises(ValueError, match="position 7"):
        sequence_logps(model, **batch, num_sequences=5)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op allocates: outputs sharing no storage with an input
    (so the transposed head weight (H, V), a view, does not count as logits)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.shapes.append(tuple(t.shape))
        return out

    def max_logit_rows(self) -> int:
        """Most rows of any allocated tensor whose last dim is the vocabulary (0 if none)."""
        return max((math.prod(s[:-1]) for s in self.shapes if s and s[-1] == V), default=0)


@pytest.mark.parametrize("chunk_size", [4, 10_000])
def test_full_logits_are_never_built(chunk_size):
    """Forward and backward allocate at most min(chunk_size, N) rows of logits; naive allocates B·T."""
    model = tiny_llama()
    input_ids, completion_mask, attention_mask = padded(sequences())
    B, T = input_ids.shape
    N = int(completion_mask.sum())
    assert B * T > N > chunk_size or chunk_size > B * T

    naive = _AllocationRecorder()
    with naive:
        naive_sequence_logps(model, input_ids, completion_mask, attention_mask).sums.sum().backward()
    assert naive.max_logit_rows() == B * T  # the recorder does see full logits when they exist

    forward, backward = _AllocationRecorder(), _AllocationRecorder()
    with forward:
        out = sequence_logps(
            model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=chunk_size
        )
    with backward:
        out.sums.sum().backward()
    # Exactly the completion positions reach the head: no prompt or pad rows, never more than one chunk.
    assert forward.max_logit_rows() == min(chunk_size, N)
    assert backward.max_logit_rows() == min(chunk_size, N)


def test_frozen_head_gets_no_gradient_and_the_rest_match_naive():
    model = tiny_llama(dtype=torch.float64)
    model.lm_head.weight.requires_grad_(False)
    input_ids, completion_mask, attention_mask = padded(sequences())
    loss_of(naive_sequence_logps(model, input_ids, completion_mask, attention_mask)).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    loss_of(
        sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=3)
    ).backward()
    assert model.lm_head.weight.grad is None
    assert "lm_head.weight" not in expected
    assert_grads_close(grads(model), expected, atol=1e-10, rtol=1e-8)


def test_bf16_autocast_returns_float32_close_to_naive_autocast():
    model = tiny_llama()
    input_ids, completion_mask, attention_mask = padded(sequences())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logps(model, input_ids, completion_mask, attention_mask=attention_mask, chunk_size=4)
        ref = naive_sequence_logps(model, input_ids, completion_mask, attention_mask)
        loss_of(out).backward()
    assert out.sums.dtype == torch.float32
    torch.testing.assert_close(out.sums, ref.sums.detach(), atol=0.05, rtol=0.01)
    for name, g in grads(model).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft → transformers 5
def test_peft_lora_model_uses_adapters_and_disable_adapter_gives_base():
    peft = pytest.importorskip("peft")
    model = tiny_llama(dtype=torch.float64)
    input_ids, completion_mask, attention_mask = padded(sequences())
    kwargs = dict(attention_mask=attention_mask, chunk_size=3)
    with torch.no_grad():
        base = sequence_logps(model, input_ids, completion_mask, **kwargs)
    # init_lora_weights=False: B ≠ 0, so the adapter changes the outputs from the start.
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)

    out = sequence_logps(peft_model, input_ids, completion_mask, **kwargs)
    loss_of(out).backward()
    lora_grads = grads(peft_model)
    assert lora_grads and all("lora_" in name for name in lora_grads)
    peft_model.zero_grad(set_to_none=True)
    ref = naive_sequence_logps(peft_model, input_ids, completion_mask, attention_mask)
    loss_of(ref).backward()
    torch.testing.assert_close(out.sums, ref.sums, atol=1e-10, rtol=1e-10)
    assert_grads_close(lora_grads, grads(peft_model), atol=1e-10, rtol=1e-8)
    assert (out.sums - base.sums).abs().max() > 1e-3

    with torch.no_grad(), peft_model.disable_adapter():
        off = sequence_logps(peft_model, input_ids, completion_mask, **kwargs)
    torch.testing.assert_close(off.sums, base.sums, atol=1e-12, rtol=0)


def test_models_that_transform_their_logits_are_refused_clearly():
    """Gemma-style soft-capping would make lm_head(hidden) differ from the model's logits: a user error."""
    from halokit.errors import UserError
    from halokit.models import build_tiny_model

    model = build_tiny_model(vocab_size=40, seed=0)
    model.config.final_logit_softcapping = 30.0
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(UserError, match="final_logit_softcapping=30.0"):
        sequence_logps(model, ids, torch.tensor([[False, False, True, True]]))
