"""The benchmark's FLOP counts (benchmarks/common.py): what the MFU columns divide by."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives next to src/, not inside it
    sys.path.insert(0, str(ROOT))

from benchmarks.common import SHAPES, executed_flops, forward_flops, step_flops  # noqa: E402


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_known_prompt_costs_the_full_sequence_minus_the_prompt(shape):
    """Linear layers on the completion only, attention over the rest of the causal triangle, the same head."""
    s = SHAPES[shape]
    for p, c in [(1, 1), (17, 40), (120, 3)]:
        known = forward_flops(s, p, c, prompt_known=True)
        assert known == pytest.approx(forward_flops(s, p, c) - forward_flops(s, p, 0), rel=1e-12)
        assert known < forward_flops(s, p, c)


def test_kto_kl_pairs_count_their_completions_only():
    s = SHAPES["body-heavy"]
    records = [{"prompt_ids": [0] * p, "completion_ids": [0] * c} for p, c in [(30, 10), (5, 50), (12, 12)]]
    batch = [0, 1, 2]
    trained = sum(3 * forward_flops(s, len(r["prompt_ids"]), len(r["completion_ids"])) for r in records)
    kl = sum(forward_flops(s, len(records[k]["prompt_ids"]), len(records[(k + 1) % 3]["completion_ids"]),
                           prompt_known=True) for k in batch)
    assert step_flops("kto", s, records, batch, "halokit") == pytest.approx(trained + kl, rel=1e-12)
    # halokit's KL pass runs the suffixes only: it executes less than TRL, which pads and runs the pairs in full
    assert executed_flops("kto", s, records, batch, "halokit") < executed_flops("kto", s, records, batch, "trl")


def test_dpo_rejected_completions_reuse_the_chosen_prompt():
    s = SHAPES["head-heavy"]
    records = [{"prompt_ids": [0] * p, "chosen_ids": [0] * c, "rejected_ids": [0] * r}
               for p, c, r in [(30, 10, 5), (5, 50, 20)]]
    expect = sum(3 * (forward_flops(s, p, c) + forward_flops(s, p, r, prompt_known=True))
                 for p, c, r in [(30, 10, 5), (5, 50, 20)])
    assert step_flops("dpo", s, records, [0, 1], "halokit") == pytest.approx(expect, rel=1e-12)
    assert executed_flops("dpo", s, records, [0, 1], "halokit") < executed_flops("dpo", s, records, [0, 1], "trl")


def test_the_last_layer_counts_o_proj_and_mlp_on_completion_positions_only():
    """Prompt tokens cost q/k/v in the last layer but not its o-proj and MLP: the difference between a 5-token and a
    1-token prompt (same completion) is 4 tokens of full layers below and 4 tokens of q/k/v in the last one,
    plus attention."""
    s = SHAPES["body-heavy"]
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    linear = lambda p, c: forward_flops(s, p, c) - 2 * 2 * h * ((p + c) * (p + c + 1)) / 2 * n  # noqa: E731
    extra = linear(5, 3) - linear(1, 3)
    assert extra == pytest.approx(2 * 4 * (3 * h * h * n + (h * h + 3 * h * i) * (n - 1)), rel=1e-12)
