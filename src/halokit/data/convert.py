"""Conversions between formats, writers, and the statistics behind ``halokit data inspect``."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from halokit.data.examples import (
    Example,
    FeedbackExample,
    Format,
    PreferenceExample,
    SFTExample,
    Text,
    format_of,
    to_record,
)
from halokit.errors import DataError


def pairs_to_feedback(pairs: Sequence[PreferenceExample]) -> list[FeedbackExample]:
    """Unpair preferences as the KTO paper does (arXiv 2402.01306, §4.1): each pair gives one
    desirable example (prompt, chosen) and one undesirable example (prompt, rejected).

    N pairs -> 2N feedback examples, ids ``<id>/chosen`` and ``<id>/rejected`` when the pair has one.
    """
    out: list[FeedbackExample] = []
    for pair in pairs:
        cid = None if pair.id is None else f"{pair.id}/chosen"
        rid = None if pair.id is None else f"{pair.id}/rejected"
        out.append(FeedbackExample(pair.prompt, pair.chosen, True, cid))
        out.append(FeedbackExample(pair.prompt, pair.rejected, False, rid))
    return out


def feedback_to_pairs(feedback: Sequence[FeedbackExample]) -> list[PreferenceExample]:
    """Form preference pairs from feedback on the same prompt.

    For each prompt with both desirable (D) and undesirable (U) completions, the i-th desirable is
    paired with the i-th undesirable in file order: min(|D|, |U|) pairs, each example used at most once
    (no example is counted twice, so DPO sees no more evidence than the labels carry). Prompts with
    only one kind give no pair. Ids of paired examples ``a`` and ``b`` become ``a+b``.
    """
    groups: dict[str, tuple[list[FeedbackExample], list[FeedbackExample]]] = defaultdict(lambda: ([], []))
    order: list[str] = []
    for ex in feedback:
        key = _text_key(ex.prompt)
        if key not in groups:
            order.append(key)
        groups[key][0 if ex.is_desirable else 1].append(ex)
    pairs: list[PreferenceExample] = []
    for key in order:
        good, bad = groups[key]
        for d, u in zip(good, bad):
            if d.completion == u.completion:
                continue  # the same text labelled both ways carries no preference
            pid = None if d.id is None or u.id is None else f"{d.id}+{u.id}"
            pairs.append(PreferenceExample(d.prompt, d.completion, u.completion, pid))
    return pairs


def convert(examples: Sequence[Example], to: Format) -> list[Example]:
    """Convert between formats where the meaning is kept.

    preference -> feedback (unpairing), preference -> sft (the chosen completions),
    feedback -> preference (:func:`feedback_to_pairs`), feedback -> sft (desirable only: CSFT's data),
    sft -> feedback (every completion desirable). Same format: returned unchanged.
    """
    if not examples:
        return []
    src = format_of(examples[0])
    if src == to:
        return list(examples)
    if src == "preference" and to == "feedback":
        return list(pairs_to_feedback(examples))  # type: ignore[arg-type]
    if src == "preference" and to == "sft":
        return [SFTExample(p.prompt, p.chosen, p.id) for p in examples]  # type: ignore[union-attr]
    if src == "feedback" and to == "preference":
        return list(feedback_to_pairs(examples))  # type: ignore[arg-type]
    if src == "feedback" and to == "sft":
        return [SFTExample(f.prompt, f.completion, f.id) for f in examples if f.is_desirable]  # type: ignore
    if src == "sft" and to == "feedback":
        return [FeedbackExample(s.prompt, s.completion, True, s.id) for s in examples]  # type: ignore
    raise DataError(f"cannot convert {src} data to {to}: there is no faithful mapping")


def write_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """Write examples in halokit's own format as .jsonl, .json or .parquet (by suffix), atomically."""
    path = Path(path)
    records = [to_record(e) for e in examples]
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if suffix in (".jsonl", ".ndjson"):
        with tmp.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    else:
        raise DataError(f"{path}: cannot write {suffix!r} files; use .jsonl, .json or .parquet")
    tmp.replace(path)
    return path


# -------------------------------------------------------------------------------------------- inspect
@dataclass
class Summary:
    """What ``halokit data inspect`` reports about one file."""

    format: str
    n_examples: int
    n_prompts: int
    counts: dict[str, int]
    lengths: dict[str, dict[str, float]]
    length_unit: str
    kto_weights: Any = None  # losses.KTOWeights for feedback data with both labels

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "n_examples": self.n_examples, "n_prompts": self.n_prompts,
               "counts": self.counts, "length_unit": self.length_unit, "lengths": self.lengths}
        if self.kto_weights is not None:
            out["kto_weights"] = self.kto_weights._asdict()
        return out


PERCENTILES = (50, 90, 99, 100)


def summarize(examples: Sequence[Example], *, length_fn=None, ratio_range=(1.0, 4 / 3)) -> Summary:
    """Counts, label balance, length percentiles and, for feedback data, the KTO weights that the
    paper's rule recommends (λ_D·n_D / (λ_U·n_U) in ``ratio_range``; see ``losses.kto_weights``).

    ``length_fn(text) -> int`` measures a text (tokens when a tokenizer is given); default characters.
    """
    from halokit.methods import kto_weights

    fmt = format_of(examples[0])
    measure = length_fn or (lambda t: len(_flatten(t)))
    unit = "tokens" if length_fn else "characters"
    fields = {"feedback": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
              "sft": ("prompt", "completion"), "forget": ("prompt", "completion")}[fmt]
    lengths = {f: _percentiles([measure(getattr(e, f)) for e in examples]) for f in fields}
    counts: dict[str, int] = {}
    weights = None
    if fmt == "feedback":
        n_d = sum(e.is_desirable for e in examples)  # type: ignore[union-attr]
        counts = {"desirable": n_d, "undesirable": len(examples) - n_d}
        if n_d and len(examples) - n_d:
            weights = kto_weights(n_d, len(examples) - n_d, ratio_range=tuple(ratio_range))
    elif fmt == "forget":
        n_f = sum(e.role == "forget" for e in examples)  # type: ignore[union-attr]
        counts = {"forget": n_f, "retain": len(examples) - n_f}
    n_prompts = len({_text_key(e.prompt) for e in examples})
    return Summary(fmt, len(examples), n_prompts, counts, lengths, unit, weights)


def _percentiles(values: list[int]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def _flatten(text: Text) -> str:
    return text if isinstance(text, str) else "\n".join(m["content"] for m in text)


def _text_key(text: Text) -> str:
    return text if isinstance(text, str) else json.dumps(list(text), sort_keys=True, ensure_ascii=False)
