"""Varlen attention: packed sequences attended one by one equal each sequence run alone, in values and
gradients; the slot bookkeeping is exact; models that need other masks are refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from halokit.attention import (
    MATH_MAX_LENGTH,
    NAME,
    SLOT_MULTIPLE,
    KVRecord,
    Segments,
    causal_attention,
    is_varlen,
    supports_varlen,
    use_varlen,
)
from halokit.data.collate import bucket_size, collate, layout, shared_prompt_layout
from halokit.lean import use_lean_layers
from halokit.logprobs import LogpsModel, sequence_logps

V = 61
SMALL = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 512}


def llama(**extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, initializer_range=0.2, attn_implementation="sdpa", **extra))


def pairs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, V, (p,), generator=g).tolist(), torch.randint(3, V, (c,), generator=g).tolist())
            for p, c in lengths]


def alone(model, pairs_):
    """Each sequence through the model on its own (no packing, no mask): the ground truth."""
    out = []
    for p, c in pairs_:
        ids = torch.tensor([p + c])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(p):] = True
        out.append(sequence_logps(model, ids, mask).sums[0])
    return torch.stack(out)


def test_segments_round_trip_and_padding_slots():
    # rows of width 8: sequences of 3, 4 and a padding block of 1; then 5 and padding blocks of 2 and 1
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 0]])
    seg = Segments.from_position_ids(position_ids)
    assert seg.num == 6 and seg.width == SLOT_MULTIPLE  # longest is 5, rounded up
    x = torch.arange(16.0).reshape(2, 1, 8, 1)  # (R, n, T, d), value = flat token index
    slots = seg.to_slots(x)  # (S, 1, L, 1)
    assert slots[0, 0, :4, 0].tolist() == [0, 1, 2, 2]  # past its end a slot repeats the last token
    assert slots[3, 0, :6, 0].tolist() == [8, 9, 10, 11, 12, 12]
    assert torch.equal(seg.from_slots(slots, rows=2).reshape(-1), torch.arange(16.0))


@pytest.mark.parametrize("length", [5, MATH_MAX_LENGTH + 8])  # explicit path and SDPA path
def test_causal_attention_matches_sdpa(length):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ours = causal_attention(q, k, v, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, c: causal_attention(a, b, c, scale=0.3),
                                    (q[:1, :, :6], k[:1, :, :6], v[:1, :, :6]))


@pytest.mark.parametrize("bucket", [False, True])
def test_packed_varlen_equals_each_sequence_alone(bucket):
    model = llama().double()
    seqs = pairs([(3, 4), (5, 2), (1, 6), (7, 9), (2, 2)])
    truth = alone(model, seqs)
    assert use_varlen(model) is None and is_varlen(model)
    batch = layout(seqs, pad_id=0, row_tokens=1 << 20, bucket=bucket)
    assert batch.input_ids.shape[0] == 1  # one row, no padding unless bucketed
    assert batch.input_ids.shape[1] == (bucket_size(batch.num_tokens) if bucket else batch.num_tokens)
    got = sequence_logps(model, batch.input_ids, batch.completion_mask, position_ids=batch.position_ids,
                         sequence_ids=batch.sequence_ids, num_sequences=batch.num_sequences).sums
    torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10)


def test_varlen_gradients_equal_sdpa_packed_rows():
    seqs = pairs([(4, 5), (2, 8), (6, 3), (3, 3)], seed=3)
    grads = {}
    for attn in ("sdpa", NAME):
        model = llama().double()
        if attn == NAME:
            use_varlen(model)
        batch = layout(seqs, pad_id=0, row_tokens=16)  # two rows with a padding block each
        out = sequence_logps(model, batch.input_ids, batch.completion_mask, position_ids=batch.position_ids,
                             sequence_ids=batch.sequence_ids, num_sequences=batch.num_sequences).sums
        (out * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=out.dtype)).sum().backward()
        grads[attn] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_varlen_with_gradient_checkpointing_and_bf16():
    seqs = pairs([(6, 10), (3, 12), (9, 4)], seed=5)
    model = llama()
    truth = alone(model, seqs).detach()
    use_varlen(model)
    model.activation_checkpointing_enable()
    model.train()
    batch = layout(seqs, pad_id=0, row_tokens=1 << 20, bucket=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logps(model, batch.input_ids, batch.completion_mask, position_ids=batch.position_ids,
                             sequence_ids=batch.sequence_ids, num_sequences=batch.num_sequences).sums
    out.sum().backward()
    torch.testing.assert_close(out.detach(), truth, rtol=0.02, atol=0.3)  # bf16 matmuls
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_padded_batches_and_generation_still_use_masks():
    model = llama().eval()
    use_varlen(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = model(input_ids=ids, attention_mask=mask).logits
    reference = llama().eval()
    torch.testing.assert_close(got, reference(input_ids=ids, attention_mask=mask).logits)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False))


def test_refuses_sliding_window_models():
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert "sliding" in supports_varlen(qwen)
    assert use_varlen(qwen) is not None and not is_varlen(qwen)
    plain = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False))
    assert supports_varlen(plain) is None


def test_bucket_size():
    assert [bucket_size(n) for n in (1, 16, 17, 255, 256, 600, 1000, 1025)] == [16, 16, 32, 256, 256, 608, 1024, 1088]
    for n in range(1, 5000):
        b = bucket_size(n)
        assert n <= b <= n + max(n // 16, 16) and b % 16 == 0
    assert len({bucket_size(n) for n in range(513, 1025)}) == 16  # 544, 576, …, 1024


# ------------------------------------------------------------------------------- prefix reuse (KTO's KL pass)
def kl_records(lengths, seed=0):
    return [{"prompt_ids": p, "completion_ids": c} for p, c in pairs(lengths, seed)]


def full_and_suffix(model, records, bucket=False):
    """KL pairs scored in full, and as suffixes continuing the policy pass (LogpsModel(seq, follow))."""
    n = len(records)
    opts = {"pad_id": 0, "row_tokens": 1 << 20, "bucket": bucket}
    full = collate(records, range(n), with_kl=True, **opts)
    suffix = collate(records, range(n), with_kl=True, reuse_prompts=True, **opts)
    logps = LogpsModel(model)
    with torch.no_grad():
        expected = logps(full.kl).sums
    policy, kl = logps(suffix.policy, suffix.kl)
    return expected, kl, policy, suffix


@pytest.mark.parametrize("lengths", [
    [(5, 4), (1, 6), (9, 2), (3, 3)],  # explicit attention; one prompt of a single token (nothing reused)
    [(MATH_MAX_LENGTH, 5), (20, 30), (7, 11)],  # slots longer than MATH_MAX_LENGTH: SDPA
])
def test_kl_pass_continuing_the_prompts_equals_the_full_pairs(lengths):
    """Each KL pair (prompt i, completion i+1) scored from its suffix after the policy pass equals the pair run
    in full (float64, grouped-query heads); the suffix batch holds only prompt[-1:] + completion."""
    model = llama().double()
    use_varlen(model)
    records = kl_records(lengths)
    expected, kl, policy, suffix = full_and_suffix(model, records)
    truth = alone(model, [(r["prompt_ids"], records[(i + 1) % len(records)]["completion_ids"])
                          for i, r in enumerate(records)])
    torch.testing.assert_close(kl.sums, truth, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(expected, truth, rtol=1e-10, atol=1e-10)
    assert policy.sums.requires_grad and not kl.sums.requires_grad
    assert suffix.kl.num_tokens == sum(1 + len(records[(i + 1) % len(records)]["completion_ids"])
                                       for i in range(len(records)))
    assert kl.counts.tolist() == [len(records[(i + 1) % len(records)]["completion_ids"]) for i in range(len(records))]


def test_kl_pass_reuses_the_recorded_keys_not_its_own_tokens():
    """Change one prompt token of the pass that is continued: the suffix pass's log-probs change, so they
    come from the recorded keys/values (the suffix batch itself holds no prompt token but the last)."""
    model = llama().double()
    use_varlen(model)
    records = kl_records([(6, 4), (5, 6), (8, 3)], seed=2)
    _, kl, _, suffix = full_and_suffix(model, records)
    changed = [dict(r, prompt_ids=[(r["prompt_ids"][0] + 1) % V] + r["prompt_ids"][1:]) for r in records]
    other = collate(changed, range(3), with_kl=True, reuse_prompts=True, pad_id=0, row_tokens=1 << 20)
    assert torch.equal(other.kl.input_ids, suffix.kl.input_ids)  # the suffixes are the same tokens
    _, kl_other = LogpsModel(model)(other.policy, other.kl)
    assert (kl_other.sums - kl.sums).abs().min() > 1e-6


def test_kl_pass_with_bucket_padding_and_checkpointing():
    """Bucketed suffix rows (padding segments with no prefix) and gradient checkpointing (the policy pass is
    recomputed in backward after the record is closed) give the same KL log-probs and finite gradients."""
    model = llama().double()
    use_varlen(model)
    records = kl_records([(7, 9), (4, 13), (10, 2), (3, 5), (6, 6)], seed=4)
    expected, kl, _, suffix = full_and_suffix(model, records, bucket=True)
    assert suffix.kl.input_ids.shape[1] == bucket_size(suffix.kl.num_tokens) > suffix.kl.num_tokens
    assert (suffix.kl.prefix.start[len(records):] == -1).all()  # the padding segments
    torch.testing.assert_close(kl.sums, expected, rtol=1e-10, atol=1e-10)
    model.activation_checkpointing_enable()
    model.train()
    policy, kl_ckpt = LogpsModel(model)(suffix.policy, suffix.kl)
    policy.sums.sum().backward()
    torch.testing.assert_close(kl_ckpt.sums, expected, rtol=1e-10, atol=1e-10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_suffix_pass_without_a_record_is_refused():
    model = llama()
    use_varlen(model)
    suffix = collate(kl_records([(4, 4), (3, 5)]), range(2), with_kl=True, reuse_prompts=True, pad_id=0,
                     row_tokens=1 << 20)
    with pytest.raises(RuntimeError, match="keys and values"):
        LogpsModel(model)._logps(suffix.kl, KVRecord())


# ------------------------------------------------------------------ shared prompts (preference pairs, one pass)
def preference_pairs(lengths, seed=0):
    """(prompt, chosen), …, then (prompt, rejected), … — the 2B sequences of a preference batch."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    triples = [(ids(p), ids(c), ids(r)) for p, c, r in lengths]
    return [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples]


@pytest.mark.parametrize("lengths", [
    [(4, 3, 5), (1, 2, 6), (7, 5, 1)],  # explicit attention; a one-token prompt (nothing shared)
    [(MATH_MAX_LENGTH - 4, 6, 9), (12, 20, 3)],  # SDPA slots
])
def test_shared_prompts_equal_each_sequence_alone_in_values_and_gradients(lengths):
    """Rejected sequences laid out as suffixes that attend to their chosen sequence's prompt in the same pass: the
    log-probs and every parameter's gradient equal each sequence run alone (float64; halokit's lean norms keep
    float64 where transformers' RMSNorm rounds through float32)."""
    seqs = preference_pairs(lengths)
    weights = torch.arange(1.0, len(seqs) + 1, dtype=torch.float64)
    grads = {}
    for shared in (False, True):
        model = llama().double()
        use_lean_layers(model)
        if shared:
            use_varlen(model)
            batch = shared_prompt_layout(seqs, pad_id=0, bucket=True)
            assert batch.num_tokens == sum(len(p) + len(c) for p, c in seqs) - \
                sum(max(len(p) - 1, 0) for p, _ in seqs[len(lengths):])
            out = sequence_logps(model, batch.input_ids, batch.completion_mask, position_ids=batch.position_ids,
                                 sequence_ids=batch.sequence_ids, num_sequences=batch.num_sequences,
                                 prefix=batch.prefix).sums
        else:
            out = alone(model, seqs)
        (out * weights).sum().backward()
        grads[shared] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-10, atol=1e-10)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_collate_shares_prompts_only_with_reuse_prompts_and_packing():
    records = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
               {"prompt_ids": [1, 4], "chosen_ids": [3, 2], "rejected_ids": [2]}]
    shared = collate(records, [0, 1], pad_id=0, row_tokens=1 << 20, reuse_prompts=True).policy
    assert shared.input_ids.tolist() == [[1, 5, 6, 7, 2, 1, 4, 3, 2, 6, 8, 9, 2, 4, 2]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 2, 3, 4, 5, 1, 2]]
    assert shared.sequence_ids.tolist() == [[0] * 5 + [1] * 4 + [2] * 4 + [3] * 2]
    assert shared.completion_mask.tolist() == [[False, False, False, True, True, False, False, True, True,
                                                 False, True, True, True, False, True]]
    assert shared.prefix.own and shared.prefix.start.tolist() == [-1, -1, 0, 5]
    assert shared.prefix.reused.tolist() == [0, 0, 2, 1] and shared.prefix.sizes.tolist() == [5, 4, 4, 2]
    assert shared.starts.tolist() == [0, 5, 9, 13]
    # each sequence's prompt counts as trained tokens, though the rejected ones are laid out once
    assert shared.sequence_tokens == (3 + 2) + (3 + 3) + (2 + 2) + (2 + 1) and shared.num_tokens == 15
    padded = collate(records, [0, 1], pad_id=0, packing=False).policy
    assert padded.sequence_tokens == padded.num_tokens == shared.sequence_tokens
    assert collate(records, [0, 1], pad_id=0, row_tokens=1 << 20).policy.prefix is None
    assert collate(records, [0, 1], pad_id=0, packing=False, reuse_prompts=True).policy.prefix is None
    with pytest.raises(ValueError, match="same prompts"):
        shared_prompt_layout([([1], [2]), ([3], [4])], pad_id=0)


def test_shared_prompts_under_gradient_checkpointing_give_the_same_gradients():
    """Checkpointing recomputes each layer in backward, the gather from the chosen prompt included: same values
    and gradients as without it."""
    seqs = preference_pairs([(6, 4, 7), (3, 9, 2), (8, 2, 5)], seed=7)
    batch = shared_prompt_layout(seqs, pad_id=0, bucket=True)
    results = []
    for checkpointing in (False, True):
        model = llama().double()
        use_lean_layers(model)
        use_varlen(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        out = sequence_logps(model, batch.input_ids, batch.completion_mask, position_ids=batch.position_ids,
                             sequence_ids=batch.sequence_ids, num_sequences=batch.num_sequences,
                             prefix=batch.prefix).sums
        (out * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-10, atol=1e-12, msg=name)
