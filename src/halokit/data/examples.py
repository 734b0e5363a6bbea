"""Example types and the parsing of one raw row into one example.

Four formats, named after what the methods consume:

* ``feedback``   (prompt, completion, label)  — KTO's native binary signal: desirable or not;
* ``preference`` (prompt, chosen, rejected)   — DPO and friends;
* ``sft``        (prompt, completion)         — supervised fine-tuning;
* ``forget``     (prompt, completion, role)   — unlearning, role ``forget`` or ``retain``.

A prompt is a string or a list of chat messages ``[{"role": "user", "content": "..."}, ...]``; a
completion is a string or a list of assistant messages. :func:`parse_row` raises :class:`RowError`
naming the field at fault; the loader adds the file and row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, str]
Text = str | tuple[Message, ...]
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("feedback", "preference", "sft", "forget")
Format = Literal["feedback", "preference", "sft", "forget"]
DEFAULT_DESIRABLE = ("true", "1", "yes", "desirable", "good", "positive", "thumbs_up", "up", "accepted", "👍")
DEFAULT_UNDESIRABLE = ("false", "0", "no", "undesirable", "bad", "negative", "thumbs_down", "down",
                       "rejected", "👎")
FIELDS: dict[str, tuple[str, ...]] = {
    "feedback": ("prompt", "completion", "label"),
    "preference": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "forget": ("prompt", "completion", "role"),
}


@dataclass(frozen=True)
class FeedbackExample:
    """A prompt, one completion and a binary label (KTO, arXiv 2402.01306)."""

    prompt: Text
    completion: Text
    is_desirable: bool
    id: str | None = None


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) completion."""

    prompt: Text
    chosen: Text
    rejected: Text
    id: str | None = None


@dataclass(frozen=True)
class SFTExample:
    """A prompt and a target completion."""

    prompt: Text
    completion: Text
    id: str | None = None


@dataclass(frozen=True)
class ForgetExample:
    """A prompt/completion to forget (``role="forget"``) or to keep (``role="retain"``)."""

    prompt: Text
    completion: Text
    role: Literal["forget", "retain"]
    id: str | None = None


Example = FeedbackExample | PreferenceExample | SFTExample | ForgetExample


@dataclass(frozen=True)
class LabelSpec:
    """How raw label values map to desirable / undesirable.

    bool is taken as is; integers 0/1; numbers compared with ``threshold`` when one is set
    (score >= threshold is desirable), else only 0/1; strings matched case-insensitively against the
    two value lists.
    """

    desirable: frozenset[str]
    undesirable: frozenset[str]
    threshold: float | None = None

    @classmethod
    def from_lists(cls, desirable: Sequence[str], undesirable: Sequence[str],
                   threshold: float | None = None) -> LabelSpec:
        return cls(frozenset(v.lower() for v in desirable), frozenset(v.lower() for v in undesirable), threshold)


class RowError(ValueError):
    """A row is invalid; ``field`` names the halokit field at fault (None for the whole row)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def parse_row(record: Mapping[str, Any], fmt: Format, *, columns: Mapping[str, str] | None = None,
              labels: LabelSpec | None = None, default_role: str | None = None) -> Example:
    """Turn one raw record into an example of format ``fmt``, or raise RowError.

    ``columns`` maps halokit field names to the record's column names (``{"prompt": "question"}``).
    ``default_role`` supplies the role of ``forget`` rows read from a file that is all one role.
    """
    columns = dict(columns or {})

    def get(name: str, *, required: bool = True) -> Any:
        column = columns.get(name, name)
        if column not in record:
            if not required:
                return None
            mapped = f" (mapped from data.columns.{name})" if column != name else ""
            have = ", ".join(map(str, record)) or "none"
            raise RowError(f"missing field '{column}'{mapped}; the row has: {have}", column)
        return record[column]

    row_id = _parse_id(get("id", required=False), columns.get("id", "id"))
    prompt = parse_text(get("prompt"), columns.get("prompt", "prompt"), completion=False)
    if fmt == "feedback":
        completion = parse_text(get("completion"), columns.get("completion", "completion"), completion=True)
        is_desirable = parse_label(get("label"), labels or _DEFAULT_LABELS, columns.get("label", "label"))
        return FeedbackExample(prompt, completion, is_desirable, row_id)
    if fmt == "preference":
        chosen = parse_text(get("chosen"), columns.get("chosen", "chosen"), completion=True)
        rejected = parse_text(get("rejected"), columns.get("rejected", "rejected"), completion=True)
        if chosen == rejected:
            raise RowError("chosen and rejected are identical, so the pair carries no preference",
                           columns.get("rejected", "rejected"))
        return PreferenceExample(prompt, chosen, rejected, row_id)
    if fmt == "sft":
        completion = parse_text(get("completion"), columns.get("completion", "completion"), completion=True)
        return SFTExample(prompt, completion, row_id)
    if fmt == "forget":
        completion = parse_text(get("completion"), columns.get("completion", "completion"), completion=True)
        role = get("role", required=default_role is None)
        role = default_role if role is None else role
        if role not in ("forget", "retain"):
            raise RowError(f"expected 'forget' or 'retain', got {role!r}", columns.get("role", "role"))
        if default_role is not None and role != default_role:
            raise RowError(f"row says {role!r} but this file is read as the {default_role} set",
                           columns.get("role", "role"))
        return ForgetExample(prompt, completion, role, row_id)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def parse_text(value: Any, field: str, *, completion: bool) -> Text:
    """A non-empty string, or a non-empty list of ``{"role", "content"}`` messages (as a tuple)."""
    if value is None:
        raise RowError("is null; expected text or a list of chat messages", field)
    if isinstance(value, str):
        if not value.strip():
            raise RowError("is empty", field)
        return _unicode(value, field)
    if isinstance(value, Mapping):  # a single message
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RowError(f"expected text or a list of chat messages, got {type(value).__name__}", field)
    if not value:
        raise RowError("is an empty list of messages", field)
    messages = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise RowError(f"expected a message object with 'role' and 'content', got {type(msg).__name__}",
                           where)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RowError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", where)
        if not isinstance(content, str):
            raise RowError(f"'content' must be text, got {type(content).__name__}", where)
        if completion and role != "assistant":
            raise RowError(f"a completion holds assistant messages only, got role {role!r}", where)
        messages.append({"role": role, "content": _unicode(content, where)})
    if not any(m["content"].strip() for m in messages):
        raise RowError("all messages are empty", field)
    return tuple(messages)


def _unicode(text: str, field: str) -> str:
    """``text`` if it can be written as UTF-8; JSON's ``\\ud800`` escapes can make lone surrogates that
    no tokenizer or file accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(f"is not valid Unicode (lone surrogate U+{ord(text[err.start]):04X} at character "
                       f"{err.start + 1})", field) from None
    return text


def parse_label(value: Any, spec: LabelSpec, field: str = "label") -> bool:
    """Map a raw label to ``is_desirable`` following ``spec`` (see :class:`LabelSpec`)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RowError(f"expected a finite number, got {value}", field)
        if spec.threshold is not None:
            return value >= spec.threshold
        if value in (0, 1):
            return value == 1
        raise RowError(f"numeric label {value} is neither 0 nor 1; set data.label_threshold to read "
                       f"scores", field)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in spec.desirable:
            return True
        if key in spec.undesirable:
            return False
        if spec.threshold is not None:
            try:
                return float(key) >= spec.threshold
            except ValueError:
                pass
        raise RowError(f"unknown label {value!r}; desirable values: {', '.join(sorted(spec.desirable))}; "
                       f"undesirable: {', '.join(sorted(spec.undesirable))} (data.desirable_values / "
                       f"data.undesirable_values)", field)
    if value is None:
        raise RowError("is null; expected a label", field)
    raise RowError(f"expected a bool, 0/1, a number or a label string, got {type(value).__name__}", field)


def _parse_id(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"expected a string or integer id, got {type(value).__name__}", field)
    return _unicode(str(value), field)


_DEFAULT_LABELS = LabelSpec.from_lists(DEFAULT_DESIRABLE, DEFAULT_UNDESIRABLE)


def to_record(example: Example) -> dict[str, Any]:
    """The halokit-format row for an example (inverse of :func:`parse_row` with default columns)."""

    def plain(text: Text) -> Any:
        return text if isinstance(text, str) else [dict(m) for m in text]

    row: dict[str, Any] = {} if example.id is None else {"id": example.id}
    row["prompt"] = plain(example.prompt)
    if isinstance(example, FeedbackExample):
        row.update(completion=plain(example.completion), label=example.is_desirable)
    elif isinstance(example, PreferenceExample):
        row.update(chosen=plain(example.chosen), rejected=plain(example.rejected))
    elif isinstance(example, SFTExample):
        row.update(completion=plain(example.completion))
    else:
        row.update(completion=plain(example.completion), role=example.role)
    return row


def format_of(example: Example) -> Format:
    """The format name of an example."""
    return {FeedbackExample: "feedback", PreferenceExample: "preference", SFTExample: "sft",
            ForgetExample: "forget"}[type(example)]
