"""TOFU's unlearning metrics: closed forms on hand-made losses; the losses against a direct computation."""

from dataclasses import dataclass
from math import comb, e, log

import numpy as np
import pytest
import torch

from halokit.data.tokenize import encode_many
from halokit.models import build_tiny_model
from halokit.unlearn_metrics import (
    answer_losses,
    evaluate_set,
    forget_quality,
    model_utility,
    probability,
    rouge_l_recall,
    score_items,
    truth_ratio_score,
    truth_ratios,
    utility_from_sets,
)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    paraphrased: str
    perturbed: tuple[str, ...]


ITEMS = [
    QA("Where was Ada born?", "In Paris.", "Paris is where she was born.",
       ("In Rome.", "In a small town near Oslo.")),
    QA("What does Ben write?", "Crime novels about sailors.", "Sailor crime novels.",
       ("Poems.", "Cookbooks.")),
    QA("Q?", "A long answer with many words in it, longer than all others.", "Short.", ("x", "yy")),
]


# ------------------------------------------------------------------------------------------ ROUGE-L recall
@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("Hello, World!", "hello world", 1.0),                    # case and punctuation vanish
    ("The cat sat on the mat.", "the cat is on the mat", 5 / 6),  # LCS the cat on the mat
    ("b a", "a b", 1 / 2),                                    # reordered: LCS is one word
    ("mat the on cat", "the cat on the mat", 2 / 5),         # LCS e.g. "the on" or "the cat"
    ("don't", "don t", 1.0),                                  # apostrophe splits, as in rouge_score
    ("anything", "", 0.0),                                    # empty reference
    ("anything", "?!", 0.0),                                  # reference without words
    ("", "a b", 0.0),
    ("he runs", "he run", 1 / 2),                             # no stemming (TOFU stems: would be 1)
])
def test_rouge_l_recall(prediction, reference, expected):
    assert rouge_l_recall(prediction, reference) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------- truth ratio, probability
def test_truth_ratio_and_set_scores_by_hand():
    """para L = (1, 2, 3), mean_k perturbed L = (2, 2, 2) → R = exp(para − pert) = (e⁻¹, 1, e).
    forget: mean min(R, 1/R) = (e⁻¹ + 1 + e⁻¹)/3; other sets: mean max(0, 1 − R) = (1 − e⁻¹ + 0 + 0)/3."""
    scores = {"paraphrased": np.array([1.0, 2.0, 3.0]),
              "perturbed": np.array([[1.0, 3.0], [2.0, 2.0], [0.5, 3.5]])}
    r = truth_ratios(scores)
    np.testing.assert_allclose(r, [1 / e, 1.0, e], rtol=1e-12)
    assert truth_ratio_score(r, forget=True) == pytest.approx((2 / e + 1) / 3, rel=1e-12)
    assert truth_ratio_score(r, forget=False) == pytest.approx((1 - 1 / e) / 3, rel=1e-12)


def test_probability_by_hand():
    """answer L = (0, ln 2) → P = (1, 1/2), mean 3/4. Options, perturbed L = ((ln 2, ln 4), (ln 2, ln 2)):
    item 1: 1 / (1 + 1/2 + 1/4) = 4/7; item 2: (1/2) / (3 · 1/2) = 1/3; mean (4/7 + 1/3)/2 = 19/42."""
    scores = {"answer": np.array([0.0, log(2)]), "perturbed": np.array([[log(2), log(4)], [log(2), log(2)]])}
    assert probability(scores, options=False) == pytest.approx(3 / 4, rel=1e-12)
    assert probability(scores, options=True) == pytest.approx(19 / 42, rel=1e-12)
    # huge losses do not overflow: the true answer's share stays well defined
    far = {"answer": np.array([800.0]), "perturbed": np.array([[801.0, 801.0]])}
    assert probability(far, options=True) == pytest.approx(1 / (1 + 2 / e), rel=1e-12)


# --------------------------------------------------------------------------------- forget quality, utility
def test_forget_quality_ks_pvalues():
    """Identical samples: D = 0, p = 1. Fully separated samples of sizes n, m: D = 1, and the exact
    two-sided p-value P(D ≥ 1) = 2 / C(n+m, n) (only 'all x below all y' and the reverse reach it)."""
    same = [0.2, 0.5, 0.9, 1.3]
    assert forget_quality(same, same) == pytest.approx((1.0, 0.0))
    for n, m in [(5, 5), (3, 4), (6, 8)]:
        p, d = forget_quality(np.linspace(0.1, 0.5, n), np.linspace(2.0, 3.0, m))
        assert d == 1.0 and p == pytest.approx(2 / comb(n + m, n), rel=1e-9)
    # the test is unchanged by R ↦ 1/R on both samples (TOFU's code writes the ratio the other way up)
    a, b = np.array([0.3, 0.7, 1.1, 2.0]), np.array([0.5, 0.9, 3.0])
    assert forget_quality(a, b) == pytest.approx(forget_quality(1 / a, 1 / b), rel=1e-12)


def test_model_utility_harmonic_mean():
    assert model_utility([1.0, 0.5]) == pytest.approx(2 / 3, rel=1e-12)
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / 7, rel=1e-12)
    assert model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        model_utility([])
    with pytest.raises(ValueError):
        model_utility([0.5, -0.1])
    one = {"probability": 0.5, "rouge_l": 0.25, "truth_ratio": 1.0}
    sets = {name: dict(one) for name in ("retain", "famous", "world")}
    assert utility_from_sets(sets) == pytest.approx(3 / 7, rel=1e-12)
    with pytest.raises(ValueError, match="greedy=False"):
        utility_from_sets({**sets, "world": {**sets["world"], "rouge_l": None}})
    with pytest.raises(ValueError, match="famous"):
        utility_from_sets({"retain": sets["retain"], "world": sets["world"]})


# ------------------------------------------------------------------------------------------ on a tiny model
@pytest.fixture(scope="module")
def model(byte_tok):
    return build_tiny_model(vocab_size=len(byte_tok), seed=0).eval()


def _direct_loss(model, tok, prompt, answer):
    """−mean_t log softmax(logits)[y_t] over the completion tokens, one unpadded sequence, float64 softmax."""
    enc = encode_many(tok, [(prompt, answer)])[0]
    ids = torch.tensor([enc.prompt_ids + enc.completion_ids])  # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    p = len(enc.prompt_ids)
    targets = ids[0, p:]  # (C,) the answer's tokens, EOS included
    return -float(logp[p - 1:-1].gather(1, targets[:, None]).mean())


def test_answer_losses_match_direct_computation_and_restore_mode(model, byte_tok):
    prompts = [it.question for it in ITEMS] + ["Q?"]
    answers = [it.answer for it in ITEMS] + ["z"]
    expected = [_direct_loss(model, byte_tok, p, a) for p, a in zip(prompts, answers)]
    model.train()
    try:
        got = answer_losses(model, byte_tok, prompts, answers, batch_size=3)
        assert model.training
    finally:
        model.eval()
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_score_items_equals_item_by_item(model, byte_tok):
    scores = score_items(model, byte_tok, ITEMS, batch_size=5)  # 12 sequences of mixed lengths, 3 batches
    assert scores["answer"].shape == scores["paraphrased"].shape == (3,)
    assert scores["perturbed"].shape == (3, 2)
    for i, it in enumerate(ITEMS):
        one = answer_losses(model, byte_tok, [it.question] * 4, [it.answer, it.paraphrased, *it.perturbed],
                            batch_size=1)
        np.testing.assert_allclose(scores["answer"][i], one[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores["paraphrased"][i], one[1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores["perturbed"][i], one[2:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="perturbed"):
        score_items(model, byte_tok, [ITEMS[0], QA("q", "a", "b", ("c",))])


@pytest.mark.parametrize("kind", ["forget", "retain", "options"])
def test_evaluate_set_keys_and_ranges(model, byte_tok, kind):
    out = evaluate_set(model, byte_tok, ITEMS, kind=kind, max_new_tokens=4, batch_size=4)
    assert set(out) == {"probability", "truth_ratio", "rouge_l", "ratios", "n"}
    assert out["n"] == 3 and len(out["ratios"]) == 3 and all(r > 0 for r in out["ratios"])
    for key in ("probability", "truth_ratio", "rouge_l"):
        assert 0.0 <= out[key] <= 1.0
    expected = truth_ratio_score(out["ratios"], forget=kind == "forget")
    assert out["truth_ratio"] == pytest.approx(expected, rel=1e-12)
    assert evaluate_set(model, byte_tok, ITEMS, kind=kind, greedy=False)["rouge_l"] is None


def test_evaluate_set_rejects_unknown_kind(model, byte_tok):
    with pytest.raises(ValueError, match="kind"):
        evaluate_set(model, byte_tok, ITEMS, kind="famous")
