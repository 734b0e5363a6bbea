"""Golden token ids and completion masks for the byte-level tokenizer (byte b -> id b + 3; BOS 1, EOS 2)."""

import pytest
import torch

from halokit.data.examples import FeedbackExample, PreferenceExample
from halokit.data.tokenize import TokenizeSettings, encode, encode_examples, render
from halokit.errors import DataError


def ids(text):
    return [b + 3 for b in text.encode()]


def test_plain_text_golden(byte_tok):
    enc = encode(byte_tok, "ab", "c")
    assert enc.prompt_ids == [1, 100, 101] and enc.completion_ids == [102, 2]
    input_ids, mask = enc.sequence()
    assert torch.equal(torch.tensor(input_ids), torch.tensor([1, 100, 101, 102, 2]))
    assert mask == [0, 0, 0, 1, 1]


def test_chat_golden(byte_tok):
    enc = encode(byte_tok, [{"role": "user", "content": "ab"}], "c")
    assert enc.prompt_ids == ids("<|user|>\nab") + [2] + ids("\n<|assistant|>\n")
    assert enc.completion_ids == [102, 2]  # the turn's end token is the EOS, trailing newline dropped
    always = encode(byte_tok, "ab", "c", TokenizeSettings(chat_template="always"))
    assert always == enc
    never = encode(byte_tok, [{"role": "user", "content": "ab"}], "c", TokenizeSettings(chat_template="never"))
    assert never.prompt_ids == [1] + ids("user: ab\nassistant: ")


def test_render_needs_a_template(byte_tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(DataError, match="tokenizer has no chat template"):
        render(NoTemplate(), [{"role": "user", "content": "x"}], "y")


def test_truncation_policies(byte_tok):
    s = TokenizeSettings(max_length=6, max_prompt_length=3)
    enc = encode(byte_tok, "abcde", "wxyz", s)
    assert enc.prompt_ids == [1, 103, 104]  # BOS kept in front of the kept end "de"
    assert enc.completion_ids == ids("wxy") and enc.prompt_truncated and enc.completion_truncated
    s2 = TokenizeSettings(max_length=6, max_prompt_length=3, prompt_truncation="keep_start",
                          completion_truncation="keep_end")
    enc2 = encode(byte_tok, "abcde", "wxyz", s2)
    assert enc2.prompt_ids == [1, 100, 101] and enc2.completion_ids == ids("yz") + [2]
    short = encode(byte_tok, "a", "b", s)
    assert not short.prompt_truncated and not short.completion_truncated


def test_encode_examples_records_and_report(byte_tok):
    fb = [FeedbackExample("ab", "c", True), FeedbackExample("abcdefgh", "c", False)]
    records, report = encode_examples(byte_tok, fb, TokenizeSettings(max_length=8, max_prompt_length=4))
    assert records[0] == {"prompt_ids": [1, 100, 101], "completion_ids": [102, 2], "is_desirable": True}
    assert len(records[1]["prompt_ids"]) == 4 and records[1]["is_desirable"] is False
    assert (report.rows, report.prompt_truncated, report.completion_truncated) == (2, 1, 0)
    assert "1 prompts and 0 completions truncated" in str(report)
    pref, _ = encode_examples(byte_tok, [PreferenceExample("ab", "c", "d")])
    assert pref == [{"prompt_ids": [1, 100, 101], "chosen_ids": [102, 2], "rejected_ids": [103, 2]}]
