"""A byte-level tokenizer that needs no download: 256 byte tokens plus BOS, EOS, PAD and a chat template.

Used by tests, tiny recipes and the demo. Ids: 0 ``<pad>``, 1 ``<s>`` (BOS, added in front of plain
prompts), 2 ``</s>`` (EOS, also the end of a chat turn), then byte ``b`` has id ``b + 3``.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_OFFSET = len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_level_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over raw UTF-8 bytes (vocab 259), deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    table = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({table[b]: b + BYTE_OFFSET for b in range(256)})
    assert set(table.values()) == set(byte_chars)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 1000) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (digits always split one per token, so numbers
    stay learnable), with the same special tokens and chat template as :func:`byte_level_tokenizer`.

    Ids 0–2 are ``<pad>``, ``<s>``, ``</s>``; the chat markers ``<|user|>``, ``<|assistant|>`` and
    ``<|system|>`` are single tokens. Deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    markers = ["<|user|>", "<|assistant|>", "<|system|>"]
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS) + markers,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=markers)
    tok.chat_template = CHAT_TEMPLATE
    return tok
