"""Tokenization with completion masks, EOS, chat templates and a truncation policy.

A prompt and a completion are tokenized separately, so that the loss covers exactly the completion
tokens and KTO's KL pairs (prompt i, completion j) are a concatenation of ids:

    input_ids       = prompt_ids + completion_ids           # completion_ids ends with EOS
    completion_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)

Plain text: the prompt is tokenized with the tokenizer's special tokens (BOS where it adds one), the
completion without them, and EOS is appended. Chat messages: the prompt is rendered by the tokenizer's
chat template with the generation prompt; the completion is the rest of the template's rendering of the
whole conversation, so the assistant's end-of-turn token is part of the completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from halokit.data.examples import (
    Example,
    FeedbackExample,
    ForgetExample,
    PreferenceExample,
    SFTExample,
    Text,
)
from halokit.errors import DataError


@dataclass(frozen=True)
class TokenizeSettings:
    """Lengths and policies; mirrors the ``data`` section of the config."""

    max_length: int = 1024
    max_prompt_length: int = 512
    prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end"
    completion_truncation: Literal["keep_start", "keep_end"] = "keep_start"
    chat_template: Literal["auto", "always", "never"] = "auto"

    @classmethod
    def from_data(cls, data: Any) -> TokenizeSettings:
        """From a :class:`halokit.config.DataSettings`."""
        return cls(data.max_length, data.max_prompt_length, data.prompt_truncation,
                   data.completion_truncation, data.chat_template)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt and one completion, after truncation."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_truncated: bool = False
    completion_truncated: bool = False

    def sequence(self) -> tuple[list[int], list[int]]:
        """``(input_ids, completion_mask)`` of the concatenated sequence, both of length P + C."""
        ids = self.prompt_ids + self.completion_ids
        return ids, [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)


@dataclass
class TruncationReport:
    """How many rows lost prompt or completion tokens to ``max_prompt_length`` / ``max_length``."""

    rows: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0

    def add(self, *encoded: Encoded) -> None:
        self.rows += 1
        self.prompt_truncated += any(e.prompt_truncated for e in encoded)
        self.completion_truncated += any(e.completion_truncated for e in encoded)

    def __str__(self) -> str:
        return (f"{self.rows} rows tokenized; {self.prompt_truncated} prompts and "
                f"{self.completion_truncated} completions truncated")


def render(tokenizer: Any, prompt: Text, completion: Text, mode: str = "auto") -> tuple[str, str, bool]:
    """Text of the prompt and of the completion, and whether the prompt text already holds special tokens.

    ``mode``: ``auto`` uses the chat template for message lists and plain text for strings; ``always``
    wraps string prompts as one user message; ``never`` joins messages as ``role: content`` lines.
    """
    is_chat = not isinstance(prompt, str) or not isinstance(completion, str)
    use_template = mode == "always" or (mode == "auto" and is_chat)
    if not use_template:
        return _plain(prompt, roles=True), _plain(completion, roles=False), False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the rows hold chat messages but the tokenizer has no chat template; set "
                        "data.chat_template=never to join messages as plain text")
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    reply = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
             else [dict(m) for m in completion])
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt_msgs + reply, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the tokenizer's chat template renders the prompt differently with and without the "
                        "reply, so the completion cannot be split off; use data.chat_template=never")
    return prompt_text, full_text[len(prompt_text):].rstrip(), True


def encode(tokenizer: Any, prompt: Text, completion: Text, settings: TokenizeSettings = TokenizeSettings()
           ) -> Encoded:
    """Tokenize one (prompt, completion) pair with EOS and the truncation policy (see module doc)."""
    return encode_many(tokenizer, [(prompt, completion)], settings)[0]


def encode_many(tokenizer: Any, pairs: Sequence[tuple[Text, Text]],
                settings: TokenizeSettings = TokenizeSettings()) -> list[Encoded]:
    """:func:`encode` for many pairs with one batched tokenizer call per side."""
    if not pairs:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
    rendered = [render(tokenizer, p, c, settings.chat_template) for p, c in pairs]
    templated = [r[2] for r in rendered]
    plain_prompts = [r[0] for r in rendered if not r[2]]
    chat_prompts = [r[0] for r in rendered if r[2]]
    plain_ids = iter(tokenizer(plain_prompts, add_special_tokens=True)["input_ids"] if plain_prompts else [])
    chat_ids = iter(tokenizer(chat_prompts, add_special_tokens=False)["input_ids"] if chat_prompts else [])
    completion_ids = tokenizer([r[1] for r in rendered], add_special_tokens=False)["input_ids"]
    out = []
    for is_chat, comp in zip(templated, completion_ids):
        prompt_ids = list(next(chat_ids) if is_chat else next(plain_ids))
        comp = list(comp)
        if not comp or comp[-1] != eos:
            comp.append(eos)
        out.append(_truncate(prompt_ids, comp, settings, tokenizer.bos_token_id))
    return out


def _truncate(prompt: list[int], completion: list[int], s: TokenizeSettings, bos: int | None) -> Encoded:
    prompt_cut = len(prompt) > s.max_prompt_length
    if prompt_cut:
        if s.prompt_truncation == "keep_start":
            prompt = prompt[: s.max_prompt_length]
        elif bos is not None and prompt[0] == bos:  # keep BOS in front of the kept tail
            prompt = [bos] + prompt[len(prompt) - s.max_prompt_length + 1:]
        else:
            prompt = prompt[len(prompt) - s.max_prompt_length:]
    budget = s.max_length - len(prompt)
    completion_cut = len(completion) > budget
    if completion_cut:
        completion = completion[:budget] if s.completion_truncation == "keep_start" else completion[-budget:]
    return Encoded(prompt, completion, prompt_cut, completion_cut)


def encode_examples(tokenizer: Any, examples: Sequence[Example], settings: TokenizeSettings = TokenizeSettings()
                    ) -> tuple[list[dict[str, Any]], TruncationReport]:
    """Tokenize examples of one format into plain records for the collators.

    Records: feedback ``{prompt_ids, completion_ids, is_desirable}``; sft ``{prompt_ids, completion_ids}``;
    forget ``{prompt_ids, completion_ids, is_forget}``; preference ``{prompt_ids, chosen_ids,
    rejected_ids}`` (prompt truncated once, each completion against the same prompt).
    """
    report = TruncationReport()
    if not examples:
        return [], report
    first = examples[0]
    if isinstance(first, PreferenceExample):
        chosen = encode_many(tokenizer, [(e.prompt, e.chosen) for e in examples], settings)
        rejected = encode_many(tokenizer, [(e.prompt, e.rejected) for e in examples], settings)
        records = []
        for c, r in zip(chosen, rejected):
            report.add(c, r)
            records.append({"prompt_ids": c.prompt_ids, "chosen_ids": c.completion_ids,
                            "rejected_ids": r.completion_ids})
        return records, report
    encoded = encode_many(tokenizer, [(e.prompt, e.completion) for e in examples], settings)
    records = []
    for ex, enc in zip(examples, encoded):
        report.add(enc)
        record: dict[str, Any] = {"prompt_ids": enc.prompt_ids, "completion_ids": enc.completion_ids}
        if isinstance(ex, FeedbackExample):
            record["is_desirable"] = ex.is_desirable
        elif isinstance(ex, ForgetExample):
            record["is_forget"] = ex.role == "forget"
        elif not isinstance(ex, SFTExample):
            raise TypeError(f"unknown example type {type(ex).__name__}")
        records.append(record)
    return records, report


def _plain(text: Text, *, roles: bool) -> str:
    if isinstance(text, str):
        return text
    if not roles:
        return "\n".join(m["content"] for m in text)
    return "".join(f"{m['role']}: {m['content']}\n" for m in text) + "assistant: "
