"""Conversions keep meaning and round-trip; inspect statistics and the KTO weight rule."""

import json

import pytest

from halokit.data.convert import (
    convert,
    feedback_to_pairs,
    pairs_to_feedback,
    summarize,
    write_examples,
)
from halokit.data.examples import FeedbackExample, PreferenceExample, SFTExample
from halokit.data.load import load_examples
from halokit.errors import DataError

PAIRS = [PreferenceExample("p1", "good1", "bad1", "a"), PreferenceExample("p2", "good2", "bad2", "b"),
         PreferenceExample(({"role": "user", "content": "p3"},), "good3", "bad3", "c")]


def test_unpairing_as_the_kto_paper():
    fb = pairs_to_feedback(PAIRS)
    assert len(fb) == 2 * len(PAIRS)
    assert fb[0] == FeedbackExample("p1", "good1", True, "a/chosen")
    assert fb[1] == FeedbackExample("p1", "bad1", False, "a/rejected")


def test_pairs_feedback_pairs_roundtrip():
    back = feedback_to_pairs(pairs_to_feedback(PAIRS))
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in PAIRS]
    assert back[0].id == "a/chosen+a/rejected"


def test_feedback_to_pairs_uses_each_example_once():
    fb = [FeedbackExample("p", "d1", True), FeedbackExample("p", "u1", False), FeedbackExample("p", "d2", True),
          FeedbackExample("q", "d3", True), FeedbackExample("p", "u2", False), FeedbackExample("p", "u3", False)]
    pairs = feedback_to_pairs(fb)
    assert [(p.chosen, p.rejected) for p in pairs] == [("d1", "u1"), ("d2", "u2")]


def test_convert_paths_and_refusal():
    assert convert(PAIRS, "sft")[0] == SFTExample("p1", "good1", "a")
    fb = pairs_to_feedback(PAIRS)
    assert [e.completion for e in convert(fb, "sft")] == ["good1", "good2", "good3"]
    assert all(e.is_desirable for e in convert(convert(PAIRS, "sft"), "feedback"))
    with pytest.raises(DataError, match="cannot convert sft data to preference"):
        convert([SFTExample("p", "c")], "preference")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_and_reload(tmp_path, suffix):
    fb = pairs_to_feedback(PAIRS[:2])
    path = write_examples(fb, tmp_path / f"out{suffix}")
    assert load_examples(path, "feedback").examples == fb


def test_written_jsonl_is_halokit_format(tmp_path):
    path = write_examples(pairs_to_feedback(PAIRS[2:]), tmp_path / "o.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"id": "c/chosen", "prompt": [{"role": "user", "content": "p3"}], "completion": "good3",
                     "label": True}


def test_summary_counts_lengths_and_weights():
    fb = [FeedbackExample("abcd", "xy", True)] + [FeedbackExample("ab", "xyz" * k, False) for k in range(1, 10)]
    s = summarize(fb)
    assert s.counts == {"desirable": 1, "undesirable": 9} and s.n_prompts == 2
    assert s.lengths["completion"]["p100"] == 27 and s.lengths["prompt"]["p50"] == 2
    w = s.kto_weights
    ratio = w.desirable_weight * 1 / (w.undesirable_weight * 9)
    assert 1.0 <= ratio <= 4 / 3 + 1e-9 and w.undesirable_weight == 1.0
    assert s.to_dict()["kto_weights"]["desirable_weight"] == w.desirable_weight
    assert summarize(fb, length_fn=lambda t: 1).length_unit == "tokens"
