"""The layout of sequences: golden tensors, packed == padded log-probs, KL pairs and shared prompts."""

import dataclasses

import pytest
import torch

from halokit.data.collate import collate, kl_pairs, layout
from halokit.logprobs import LogpsModel
from halokit.models import build_tiny_model

V = 259  # the byte tokenizer's vocabulary


# Four sequences (prompt ids, completion ids), slots 0..3, of lengths 5, 3, 7, 2.
PAIRS = [([10, 11], [12, 13, 14]), ([20], [21, 22]), ([30, 31, 32], [33, 34, 35, 36]), ([40], [41])]


def random_pairs(lengths, seed=0):
    """(prompt, completion) per (P, C) in ``lengths``: BOS, random bytes, EOS-terminated completion."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    return [([1] + ids(p - 1), ids(c - 1) + [2]) for p, c in lengths]


# ------------------------------------------------------------------------------------------- layout
def test_packed_layout_golden():
    """First fit decreasing into rows of 8: C(7) opens row 0 (1 free), A(5) opens row 1, B(3) fills
    row 1, D(2) fits neither and opens row 2. Width = the fullest row (8). Each row's rest is one
    padding block whose positions restart at 0 and that is never in the completion mask; its
    sequence_ids are 0 but never read (no completion token there)."""
    seq = layout(PAIRS, pad_id=9, packing=True, row_tokens=8)
    P = 9
    assert torch.equal(seq.input_ids, torch.tensor([
        [30, 31, 32, 33, 34, 35, 36, P],
        [10, 11, 12, 13, 14, 20, 21, 22],
        [40, 41, P, P, P, P, P, P],
    ]))
    assert torch.equal(seq.position_ids, torch.tensor([
        [0, 1, 2, 3, 4, 5, 6, 0],
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 0, 1, 2, 3, 4, 5],
    ]))
    assert torch.equal(seq.completion_mask, torch.tensor([
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0, 1, 1],
        [0, 1, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool))
    assert torch.equal(seq.sequence_ids, torch.tensor([
        [2, 2, 2, 2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
        [3, 3, 0, 0, 0, 0, 0, 0],
    ]))
    assert seq.attention_mask is None
    assert (seq.num_sequences, seq.num_tokens) == (4, 17)
    assert not seq.completion_mask[seq.input_ids == P].any()
    assert seq.input_ids.dtype == seq.position_ids.dtype == seq.sequence_ids.dtype == torch.long


def test_packed_row_grows_to_fit_a_sequence_longer_than_row_tokens():
    """A sequence longer than row_tokens gets a row of its own length; the others still pack."""
    seq = layout(PAIRS, pad_id=0, packing=True, row_tokens=4)
    # capacity 7: C(7) | A(5) + D(2) | B(3) + a padding block of 4
    assert seq.input_ids.shape == (3, 7)
    assert seq.input_ids.tolist() == [[30, 31, 32, 33, 34, 35, 36], [10, 11, 12, 13, 14, 40, 41],
                                      [20, 21, 22, 0, 0, 0, 0]]
    assert seq.sequence_ids[1].tolist() == [0, 0, 0, 0, 0, 3, 3]
    assert seq.position_ids[2].tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_padded_layout_pads_to_the_batch_max_with_an_attention_mask():
    seq = layout(PAIRS, pad_id=9, packing=False, row_tokens=2048)
    assert seq.input_ids.shape == (4, 7)  # the longest sequence here, not row_tokens
    assert torch.equal(seq.input_ids, torch.tensor([
        [10, 11, 12, 13, 14, 9, 9],
        [20, 21, 22, 9, 9, 9, 9],
        [30, 31, 32, 33, 34, 35, 36],
        [40, 41, 9, 9, 9, 9, 9],
    ]))
    assert torch.equal(seq.attention_mask, torch.tensor([
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0],
    ]))
    assert torch.equal(seq.completion_mask, torch.tensor([
        [0, 0, 1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 0, 0],
    ], dtype=torch.bool))
    assert torch.equal(seq.position_ids, torch.arange(7).expand(4, 7))
    assert seq.sequence_ids is None
    assert (seq.num_sequences, seq.num_tokens) == (4, 17)
    # another micro-batch of shorter sequences gets a narrower tensor: no global max_length
    assert layout(PAIRS[1::2], pad_id=9, packing=False).input_ids.shape == (2, 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_layouts_give_the_same_logps(attn):
    """sequence_logps on the packed rows (no mask, restarting positions) equals the padded rows (mask).

    The check can fail: the same rows with positions that do not restart let attention cross into the
    previous sequence, which moves those sequences' log-probs by > 1e-3.
    """
    lengths = [(5, 4), (3, 8), (8, 2), (2, 3), (4, 4), (6, 1)]
    pairs = random_pairs(lengths)
    model = LogpsModel(build_tiny_model(vocab_size=V, seed=0, attn_implementation=attn))
    packed = layout(pairs, pad_id=0, packing=True, row_tokens=16)
    padded = layout(pairs, pad_id=0, packing=False)
    assert packed.input_ids.shape[0] < len(pairs)  # some row really holds several sequences
    leaky = dataclasses.replace(packed, position_ids=torch.arange(packed.input_ids.shape[1]).expand_as(
        packed.input_ids).clone())
    with torch.no_grad():
        a, b, c = model(packed), model(padded), model(leaky)
    assert a.sums.dtype == b.sums.dtype == torch.float32
    assert a.counts.tolist() == b.counts.tolist() == [n for _, n in lengths]
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-5)
    assert (a.sums < 0).all()
    assert (a.sums - c.sums).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ KL pairs
def test_kl_pairs_shift_completions_by_one():
    prompts, completions = [[1], [2], [3]], [[10], [20], [30]]
    assert kl_pairs(prompts, completions) == [([1], [20]), ([2], [30]), ([3], [10])]
    assert kl_pairs(prompts[:2], completions[:2]) == [([1], [20]), ([2], [10])]
    with pytest.raises(ValueError, match="at least 2"):
        kl_pairs([[1]], [[10]])


def test_collate_builds_kl_pairs_and_labels():
    records = [{"prompt_ids": p, "completion_ids": c, "is_desirable": i % 2 == 0} for i, (p, c) in enumerate(PAIRS)]
    batch = collate(records, [2, 0, 3], with_kl=True, pad_id=0, packing=False)
    assert batch.index.tolist() == [2, 0, 3]
    assert batch.is_desirable.tolist() == [True, True, False]
    # policy: (x_2, y_2), (x_0, y_0), (x_3, y_3); kl: (x_2, y_0), (x_0, y_3), (x_3, y_2)
    expect_policy = [[30, 31, 32, 33, 34, 35, 36], [10, 11, 12, 13, 14, 0, 0], [40, 41, 0, 0, 0, 0, 0]]
    expect_kl = [[30, 31, 32, 12, 13, 14], [10, 11, 41, 0, 0, 0], [40, 33, 34, 35, 36, 0]]
    assert batch.policy.input_ids.tolist() == expect_policy
    assert batch.kl.input_ids.tolist() == expect_kl
    assert batch.kl.completion_mask.sum(1).tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match="at least 2"):
        collate(records, [1], with_kl=True)
    assert collate(records, [0, 1]).kl is None


def test_kl_pairs_as_suffixes_of_the_policy_prompts_golden():
    """reuse_prompts: pair i = (prompt i, completion i+1) holds prompt i's last token and the completion, at the
    positions they have in the full pair; its Prefix names where prompt i starts in the policy row and how
    many of its tokens are reused. Bucketed, the rest of the row is padding segments (start −1, reused 0)."""
    records = [{"prompt_ids": [1, 10, 11], "completion_ids": [12, 2], "is_desirable": True},
               {"prompt_ids": [1, 20], "completion_ids": [21, 22, 23, 2], "is_desirable": False},
               {"prompt_ids": [1], "completion_ids": [31, 2], "is_desirable": True}]
    batch = collate(records, [0, 1, 2], with_kl=True, pad_id=0, row_tokens=1 << 20, reuse_prompts=True)
    assert batch.policy.input_ids.tolist() == [[1, 20, 21, 22, 23, 2, 1, 10, 11, 12, 2, 1, 31, 2]]
    assert batch.policy.starts.tolist() == [6, 0, 11]
    kl = batch.kl
    assert kl.input_ids.tolist() == [[11, 21, 22, 23, 2, 20, 31, 2, 1, 12, 2]]
    assert kl.position_ids.tolist() == [[2, 3, 4, 5, 6, 1, 2, 3, 0, 1, 2]]
    assert kl.sequence_ids.tolist() == [[0] * 5 + [1] * 3 + [2] * 3]
    assert kl.completion_mask.tolist() == [[False, True, True, True, True, False, True, True, False, True, True]]
    assert kl.prefix.start.tolist() == [6, 0, 11] and kl.prefix.reused.tolist() == [2, 1, 0]
    assert kl.prefix.sizes.tolist() == [5, 3, 3]
    assert kl.num_sequences == 3 and kl.num_tokens == 11 and kl.attention_mask is None
    assert kl.sequence_tokens == (3 + 4) + (2 + 2) + (1 + 2)  # (prompt i, completion i+1), prompts counted in full

    bucketed = collate(records, [0, 1, 2], with_kl=True, pad_id=0, row_tokens=1 << 20, reuse_prompts=True,
                       bucket=True).kl
    assert bucketed.input_ids.shape == (1, 16) and bucketed.input_ids[0, 11:].tolist() == [0] * 5
    assert bucketed.sequence_tokens == kl.sequence_tokens  # padding segments add nothing
    # padding blocks are no longer than the longest pair (7 tokens), each its own segment from position 0
    assert bucketed.prefix.sizes.tolist() == [5, 3, 3, 5] and bucketed.prefix.start.tolist() == [6, 0, 11, -1]
    assert bucketed.position_ids[0, 11:].tolist() == [0, 1, 2, 3, 4]
    assert not bucketed.completion_mask[0, 11:].any()
    moved = batch.to("cpu")
    assert torch.equal(moved.kl.prefix.sizes, kl.prefix.sizes)
    # padded layouts have no prefix reuse: the KL pairs in full
    assert collate(records, [0, 1, 2], with_kl=True, packing=False, reuse_prompts=True).kl.prefix is None


def test_collate_of_pairs_gives_2b_sequences_chosen_first():
    records = [{"prompt_ids": [1, 100 + i], "chosen_ids": [50 + i, 2], "rejected_ids": [60 + i, 61, 2]}
               for i in range(3)]
    batch = collate(records, [2, 0], pad_id=0, packing=False)
    assert batch.num_examples == 2 and batch.policy.num_sequences == 4
    assert batch.policy.input_ids.tolist() == [
        [1, 102, 52, 2, 0], [1, 100, 50, 2, 0],  # chosen of examples 2, 0
        [1, 102, 62, 61, 2], [1, 100, 60, 61, 2],  # then their rejected
    ]
    assert batch.policy.completion_mask.sum(1).tolist() == [2, 2, 3, 3]
    assert batch.is_desirable is None and batch.kl is None
    packed = collate(records, [2, 0], pad_id=0, packing=True, row_tokens=64)
    assert packed.policy.input_ids.tolist() == [[1, 102, 62, 61, 2, 1, 100, 60, 61, 2, 1, 102, 52, 2, 1, 100, 50, 2]]
    assert packed.policy.sequence_ids.tolist() == [[2] * 5 + [3] * 5 + [0] * 4 + [1] * 4]
