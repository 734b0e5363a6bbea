"""Row parsing: every problem names its field; labels map as configured."""

import pytest

from halokit.data.examples import (
    FeedbackExample,
    ForgetExample,
    LabelSpec,
    PreferenceExample,
    RowError,
    SFTExample,
    parse_label,
    parse_row,
    to_record,
)

SPEC = LabelSpec.from_lists(["thumbs_up", "good"], ["thumbs_down", "bad"])
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), ("thumbs_up", True),
    (" Thumbs_Down ", False), ("GOOD", True),
])
def test_labels(value, expected):
    assert parse_label(value, SPEC) is expected


@pytest.mark.parametrize("value, message", [
    ("maybe", "unknown label 'maybe'"), (2, "numeric label 2 is neither 0 nor 1"),
    (None, "is null"), ([1], "expected a bool, 0/1"), (float("nan"), "expected a finite number"),
])
def test_bad_labels(value, message):
    with pytest.raises(RowError, match=message) as err:
        parse_label(value, SPEC, "thumb")
    assert err.value.field == "thumb"


def test_threshold_reads_scores():
    spec = LabelSpec.from_lists([], [], threshold=0.5)
    assert parse_label(0.7, spec) and not parse_label(0.2, spec) and parse_label("0.9", spec)


def test_formats_and_column_mapping():
    ex = parse_row({"q": CHAT, "a": "yo", "thumb": "good", "uid": 7}, "feedback",
                   columns={"prompt": "q", "completion": "a", "label": "thumb", "id": "uid"}, labels=SPEC)
    assert ex == FeedbackExample(tuple(CHAT), "yo", True, "7")
    pref = parse_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference")
    assert pref == PreferenceExample("p", "a", "b")
    assert parse_row({"prompt": "p", "completion": "c"}, "sft") == SFTExample("p", "c")
    assert parse_row({"prompt": "p", "completion": "c"}, "forget", default_role="retain").role == "retain"
    assert parse_row({"prompt": "p", "completion": "c", "role": "forget"}, "forget") == \
        ForgetExample("p", "c", "forget")


@pytest.mark.parametrize("record, fmt, field, message", [
    ({"completion": "c", "label": 1}, "feedback", "prompt", "missing field 'prompt'; the row has: completion"),
    ({"prompt": "", "completion": "c", "label": 1}, "feedback", "prompt", "is empty"),
    ({"prompt": None, "completion": "c"}, "sft", "prompt", "is null"),
    ({"prompt": 3, "completion": "c"}, "sft", "prompt", "expected text or a list of chat messages, got int"),
    ({"prompt": [], "completion": "c"}, "sft", "prompt", "empty list of messages"),
    ({"prompt": [{"role": "robot", "content": "x"}], "completion": "c"}, "sft", "prompt[0]", "unknown role"),
    ({"prompt": [{"role": "user", "content": 5}], "completion": "c"}, "sft", "prompt[0]", "'content' must be text"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "x"}]}, "sft", "completion[0]",
     "assistant messages only"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "preference", "rejected", "identical"),
    ({"prompt": "p", "completion": "c", "role": "keep"}, "forget", "role", "expected 'forget' or 'retain'"),
    ({"prompt": "p", "completion": "c", "id": 1.5}, "sft", "id", "string or integer id"),
    # regression: JSON's \ud800 escape decodes to a lone surrogate, which crashed the tokenizer in training
    ({"prompt": "caf\ud800", "completion": "c"}, "sft", "prompt", "is not valid Unicode"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "\udfff"}]}, "sft", "completion[0]",
     "lone surrogate"),
    ({"prompt": "p", "completion": "c", "id": "\ud800"}, "sft", "id", "lone surrogate"),
])
def test_bad_rows_name_the_field(record, fmt, field, message):
    with pytest.raises(RowError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        parse_row(record, fmt)
    assert err.value.field == field


def test_mapped_missing_column_says_so():
    with pytest.raises(RowError, match=r"missing field 'question' \(mapped from data.columns.prompt\)"):
        parse_row({"completion": "c"}, "sft", columns={"prompt": "question"})


def test_forget_file_role_mismatch():
    with pytest.raises(RowError, match="row says 'retain' but this file is read as the forget set"):
        parse_row({"prompt": "p", "completion": "c", "role": "retain"}, "forget", default_role="forget")


@pytest.mark.parametrize("example", [
    FeedbackExample(tuple(CHAT), "c", False, "a"), PreferenceExample("p", "a", "b"), SFTExample("p", "c", "1"),
    ForgetExample("p", ({"role": "assistant", "content": "c"},), "forget"),
])
def test_to_record_roundtrip(example):
    fmt = {FeedbackExample: "feedback", PreferenceExample: "preference", SFTExample: "sft",
           ForgetExample: "forget"}[type(example)]
    assert parse_row(to_record(example), fmt) == example
