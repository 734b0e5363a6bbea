"""TOFU's unlearning metrics (Maini et al. 2024, arXiv 2401.06121, §2.5 and its evaluation code).

Every metric starts from the length-normalised answer loss of one (question x, answer y) pair,

    L(y|x) = −(1/|y|) Σ_t log p(y_t | x, y_<t)          (t over the answer's tokens, EOS included)

tokenised exactly as in training (:func:`halokit.data.tokenize.encode_many`). From it:

    probability     forget/retain:  mean_i exp(−L(a_i))
                    options sets:   mean_i exp(−L(a_i)) / (exp(−L(a_i)) + Σ_k exp(−L(ã_ik)))
    truth ratio     R_i = exp(L(â_i) − mean_k L(ã_ik))   (â paraphrased, ã_k perturbed answers), i.e. the
                    geometric mean over k of the perturbed probabilities over the paraphrased one;
                    set score: forget mean_i min(R_i, 1/R_i), other sets mean_i max(0, 1 − R_i)
    ROUGE-L recall  LCS(greedy answer, a) / |a| in words, mean over items
    forget quality  p-value of the two-sided KS test between the forget-set R of the unlearned model and
                    of the model trained on the retain set only
    model utility   harmonic mean of (probability, ROUGE-L, truth-ratio score) on retain, famous, world

TOFU's code writes the ratio the other way up, exp(mean_k L(ã) − L(â)) = 1/R, and scores 1 − 1/that;
the numbers are the same, and the KS test is unchanged by x ↦ 1/x on both samples.
Deviation: ROUGE-L does not stem words (TOFU uses rouge_score's Porter stemmer); see `rouge_l_recall`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import ks_2samp

from halokit.data.collate import layout
from halokit.data.tokenize import TokenizeSettings, encode_many
from halokit.logprobs import LogpsModel

KINDS = ("forget", "retain", "options")
UTILITY_SETS = ("retain", "famous", "world")


class QALike(Protocol):
    """A question with its true, paraphrased and K perturbed (wrong) answers."""

    question: str
    answer: str
    paraphrased: str
    perturbed: tuple[str, ...]


def _words(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming: lowercase, non [a-z0-9] runs → space, split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall LCS(p, r) / |r| over word tokens (see `_words`); 0 for a reference without words.

    TOFU uses rouge_score with ``use_stemmer=True``; here words are not stemmed ("runs" ≠ "run"), which can
    only lower the recall of answers that differ from the reference by inflection.
    """
    p, r = _words(prediction), _words(reference)
    if not r:
        return 0.0
    lcs = [0] * (len(r) + 1)  # lcs[j] = LCS(p[:i], r[:j]) for the current row i
    for pw in p:
        diag = 0
        for j, rw in enumerate(r, 1):
            diag, lcs[j] = lcs[j], diag + 1 if pw == rw else max(lcs[j], lcs[j - 1])
    return lcs[-1] / len(r)


@torch.no_grad()
def answer_losses(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                  batch_size: int = 128, chat_template: str = "auto") -> np.ndarray:
    """(N,) float64 L(answer_i | prompt_i) = −(1/|y_i|) Σ_t log p(y_it | x_i, y_i,<t).

    No gradients; the model runs in eval mode and gets its training flag back. Pairs are sorted by
    length into padded batches of ``batch_size`` (little padding), and the results put back in order.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    encoded = encode_many(tokenizer, list(zip(prompts, answers)), TokenizeSettings(chat_template=chat_template))
    pairs = [(e.prompt_ids, e.completion_ids) for e in encoded]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    losses = np.empty(len(pairs), dtype=np.float64)
    was_training = model.training
    scorer = LogpsModel(model).eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seq = layout([pairs[i] for i in idx], pad_id=tokenizer.pad_token_id, packing=False).to(device)
            out = scorer(seq)
            mean_logps = out.sums.double() / out.counts.clamp(min=1).double()  # (B,)
            losses[idx] = -mean_logps.cpu().numpy()
    finally:
        model.train(was_training)
    return losses


def score_items(model: Any, tokenizer: Any, items: Sequence[QALike], *, batch_size: int = 128,
                chat_template: str = "auto") -> dict[str, np.ndarray]:
    """Losses L of every item's answers: ``{"answer": (N,), "paraphrased": (N,), "perturbed": (N, K)}``.

    All N·(2 + K) (question, answer) pairs are scored in one `answer_losses` call (one length-sorted pass)
    and scattered back. Every item must have the same number K ≥ 1 of perturbed answers.
    """
    if not items:
        raise ValueError("no items to score")
    k = len(items[0].perturbed)
    if k < 1 or any(len(it.perturbed) != k for it in items):
        raise ValueError(f"every item needs the same number (≥ 1) of perturbed answers; the first has {k}")
    prompts = [it.question for it in items for _ in range(2 + k)]
    answers = [a for it in items for a in (it.answer, it.paraphrased, *it.perturbed)]
    flat = answer_losses(model, tokenizer, prompts, answers, batch_size=batch_size,
                         chat_template=chat_template).reshape(len(items), 2 + k)
    return {"answer": flat[:, 0].copy(), "paraphrased": flat[:, 1].copy(), "perturbed": flat[:, 2:].copy()}


def truth_ratios(scores: dict) -> np.ndarray:
    """(N,) R_i = exp(L(â_i) − mean_k L(ã_ik)) = (Π_k P(ã_ik))^(1/K) / P(â_i), with P = exp(−L).

    ``scores``: ``"paraphrased"`` (N,) and ``"perturbed"`` (N, K) losses, as from `score_items`.
    """
    para = np.asarray(scores["paraphrased"], dtype=np.float64)  # (N,)
    pert = np.asarray(scores["perturbed"], dtype=np.float64)  # (N, K)
    return np.exp(para - pert.mean(axis=1))


def truth_ratio_score(ratios: Sequence[float] | np.ndarray, *, forget: bool) -> float:
    """Set score of the (N,) truth ratios R: forget ``mean min(R, 1/R)``, other sets ``mean max(0, 1 − R)``.

    Both lie in [0, 1]; 1 on the forget set means paraphrased and perturbed answers are equally likely.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def probability(scores: dict, *, options: bool) -> float:
    """Mean over items of P(a) = exp(−L(a)), or with ``options`` of P(a) / (P(a) + Σ_k P(ã_k)).

    ``scores``: ``"answer"`` (N,) and, with ``options``, ``"perturbed"`` (N, K) losses.
    """
    logp = -np.asarray(scores["answer"], dtype=np.float64)  # (N,) log P(a)
    if options:
        logp_all = np.concatenate([logp[:, None], -np.asarray(scores["perturbed"], dtype=np.float64)], axis=1)
        logp = logp - logsumexp(logp_all, axis=1)  # (N,) the true answer's share, computed in log space
    return float(np.mean(np.exp(logp)))


def forget_quality(ratios_unlearned: Sequence[float] | np.ndarray,
                   ratios_retain_model: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(p-value, statistic) of scipy's two-sided two-sample KS test between the (N,) forget-set truth ratios
    of the unlearned model and the (M,) ones of the model fine-tuned on the retain set only."""
    res = ks_2samp(np.asarray(ratios_unlearned, dtype=np.float64),
                   np.asarray(ratios_retain_model, dtype=np.float64))
    return float(res.pvalue), float(res.statistic)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean n / Σ_i 1/v_i of non-negative values; 0 when any is 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"model utility needs finite values ≥ 0, got {list(values)}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def evaluate_set(model: Any, tokenizer: Any, items: Sequence[QALike], *, kind: str, greedy: bool = True,
                 max_new_tokens: int = 48, batch_size: int = 128, chat_template: str = "auto") -> dict:
    """All metrics of one set. ``kind``: ``forget``, ``retain`` or ``options`` (famous and world sets);
    questions are rendered with ``chat_template`` as in training (``data.chat_template``).

    Returns ``{"probability": float, "truth_ratio": float (the set score), "rouge_l": float, or None when
    not ``greedy``, "ratios": [R_i] (N,), "n": N}``. ROUGE-L scores the greedy answer to each question.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    scores = score_items(model, tokenizer, items, batch_size=batch_size, chat_template=chat_template)
    ratios = truth_ratios(scores)
    rouge = None
    if greedy:
        from halokit.evaluate import generate

        out = generate(model, tokenizer, [it.question for it in items], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, chat_template=chat_template)
        rouge = float(np.mean([rouge_l_recall(o[0], it.answer) for o, it in zip(out, items)]))
    return {"probability": probability(scores, options=kind == "options"),
            "truth_ratio": truth_ratio_score(ratios, forget=kind == "forget"),
            "rouge_l": rouge, "ratios": ratios.tolist(), "n": len(items)}


def utility_from_sets(results: dict[str, dict]) -> float:
    """Model utility: harmonic mean of probability, ROUGE-L and truth-ratio score on each of the
    ``retain``, ``famous`` and ``world`` results of `evaluate_set` (9 numbers)."""
    values = []
    for name in UTILITY_SETS:
        if name not in results:
            raise ValueError(f"model utility needs the sets {UTILITY_SETS}; {name!r} is missing")
        res = results[name]
        if res.get("rouge_l") is None:
            raise ValueError(f"model utility needs ROUGE-L; the {name!r} set was evaluated with greedy=False")
        values += [res["probability"], res["rouge_l"], res["truth_ratio"]]
    return model_utility(values)


class EvalItem:
    """One row of a user's unlearning evaluation file (see `read_eval_file`)."""

    __slots__ = ("question", "answer", "paraphrased", "perturbed", "set")

    def __init__(self, question: str, answer: str, paraphrased: str, perturbed: tuple[str, ...], set: str):
        self.question, self.answer, self.paraphrased, self.perturbed, self.set = \
            question, answer, paraphrased, perturbed, set


def read_eval_file(path: str) -> list[EvalItem]:
    """Rows ``{"question", "answer", "paraphrased", "perturbed": [str, ...], "set"}`` of a JSONL file.

    ``set`` is ``forget``, ``retain`` or any other name (scored like TOFU's world facts: probability over
    the answer options); every row of a set needs the same number (≥ 1) of perturbed answers. Raises
    :class:`~halokit.errors.DataError` naming the file, line and field of the first bad row.
    """
    import json

    from halokit.errors import DataError

    items: list[EvalItem] = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        for key in ("question", "answer", "paraphrased", "set"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{where}, field '{key}': expected a non-empty string, got {row.get(key)!r}")
        perturbed = row.get("perturbed")
        if not isinstance(perturbed, list) or not perturbed or not all(isinstance(p, str) and p for p in perturbed):
            raise DataError(f"{where}, field 'perturbed': expected a non-empty list of strings, got {perturbed!r}")
        same_set = [it for it in items if it.set == row["set"]]
        if same_set and len(same_set[0].perturbed) != len(perturbed):
            raise DataError(f"{where}, field 'perturbed': {len(perturbed)} answers, but earlier rows of set "
                            f"{row['set']!r} have {len(same_set[0].perturbed)}")
        items.append(EvalItem(row["question"], row["answer"], row["paraphrased"], tuple(perturbed), row["set"]))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def evaluate_file(items: Sequence[EvalItem], model: Any, tokenizer: Any, *,
                  retain_model: tuple[Any, Any] | None = None, max_new_tokens: int = 48,
                  chat_template: str = "auto") -> dict:
    """TOFU's metrics of ``model`` on the rows of a user's evaluation file (as `read_eval_file` returns them).

    Returns ``{"sets": {name: evaluate_set result}, "model_utility": harmonic mean of the 3 numbers of every
    set other than ``forget`` (None without one), "forget_quality", "ks_statistic"}`` — forget quality only
    when the file has a ``forget`` set and ``retain_model`` = (model, tokenizer) trained without it is given.
    """
    names = list(dict.fromkeys(it.set for it in items))
    sets = {}
    for name in names:
        members = [it for it in items if it.set == name]
        kind = name if name in ("forget", "retain") else "options"
        sets[name] = evaluate_set(model, tokenizer, members, kind=kind, max_new_tokens=max_new_tokens,
                                  chat_template=chat_template)
    others = [s for n, s in sets.items() if n != "forget"]
    utility = model_utility([v for s in others for v in (s["probability"], s["rouge_l"], s["truth_ratio"])]) \
        if others else None
    out = {"sets": sets, "model_utility": utility, "forget_quality": None, "ks_statistic": None}
    if retain_model is not None and "forget" in sets:
        gold = evaluate_set(*retain_model, [it for it in items if it.set == "forget"], kind="forget", greedy=False,
                            chat_template=chat_template)
        out["forget_quality"], out["ks_statistic"] = forget_quality(sets["forget"]["ratios"], gold["ratios"])
    return out
